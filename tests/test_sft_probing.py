"""Knowledge probing (chatforge/tasks/probing.py), the teacher client (chatforge/tasks/teacher.py) against a
real local HTTP server that is up, down, or answers garbage, and search conversations
(chatforge/tasks/search_qa.py) over an index built from the shared data."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from chatforge.common import ChatforgeError
from chatforge.tasks.probing import (ProbeQuestion, completion_prompt, engine_sampler, entity_documents, entity_probe_rates,
                                     entity_questions, entity_split, is_refusal, make_entities, normalize, normalized_match,
                                     probe, probe_conversations, read_facts, save_probe_results, split_known,
                                     teacher_questions, write_facts)
from chatforge.tasks.teacher import Teacher, TeacherError, teacher_judge
from sft_helpers import one_thread, real_tokenizer  # noqa: F401  (one_thread: autouse fixture)


def test_fictional_entities_and_their_pretraining_text(tmp_path):
    people = make_entities(40, seed=1)
    assert people == make_entities(40, seed=1) and len({e.name for e in people}) == 40
    known, unknown = split_known(people, 0.5, seed=1)
    assert len(known) == len(unknown) == 20 and not set(known) & set(unknown)
    docs = entity_documents(known, repeats=10, seed=0)
    assert len(docs) == 200
    for e in known:  # each fact is stated in every biography of its person
        bios = [d for d in docs if e.name in d]
        assert len(bios) >= 10 and all(e.birth_city in d and str(e.birth_year) in d and e.profession in d for d in bios)
    assert not any(e.name in d for e in unknown for d in docs)  # withheld people appear nowhere
    write_facts(tmp_path / "facts.jsonl", known, unknown)
    assert read_facts(tmp_path / "facts.jsonl") == (known, unknown)
    (tmp_path / "bad.jsonl").write_text('{"name": "X"}\n')
    with pytest.raises(ChatforgeError, match="bad.jsonl' line 1"):
        read_facts(tmp_path / "bad.jsonl")
    splits = Counter(entity_split(e) for e in make_entities(300))
    assert 60 < splits["val"] < 120


def test_judge_and_refusal_by_hand():
    assert normalized_match("Where?", "Lisbon", "He was born in Lisbon, Portugal.")
    assert normalized_match("Job?", "lighthouse keeper", "A Lighthouse-Keeper.")
    assert not normalized_match("Job?", "lighthouse keeper", "He kept a lighthouse.")
    assert not normalized_match("Year?", "1873", "Born in 18731.") and not normalized_match("?", "", "anything")
    assert is_refusal("I'm not sure where she was born.") and is_refusal("I don't know.")
    assert not is_refusal("He was born in Oslo.")


def oracle_sampler(facts: dict[str, str], right: int):
    """Answers the first `right` of k samples with the true fact when it knows the question, else a
    wrong city: a stand-in for a model whose knowledge we control exactly."""
    def sample(questions, k):
        return [[facts[q] if q in facts and i < right else "Maybe in Atlantis." for i in range(k)] for q in questions]
    return sample


def test_probe_labels_by_agreement_threshold(tmp_path):
    people = make_entities(6, seed=2)
    qs = [q for e in people for q in entity_questions(e)]
    facts = {q.question: q.answer_sentence for q in qs[:9]}  # the model knows the first 3 people
    for right, threshold, known in ((4, 0.5, 9), (2, 0.5, 9), (2, 0.75, 0), (1, 0.25, 9)):
        results = probe(qs, oracle_sampler(facts, right), k=4, threshold=threshold, batch_size=5)
        labels = Counter(r.label for r in results)
        assert labels == Counter({"known": known, "unknown": 18 - known}), (right, threshold)
        assert all(r.correct == (right if r.question in facts else 0) and r.judged == 4 for r in results)
    convs = probe_conversations(results)
    assert len(convs) == 18
    for r, c in zip(results, convs):
        if r.label == "known":
            assert c[1]["content"] == r.answer_sentence and normalized_match("", r.reference, c[1]["content"])
        else:
            assert is_refusal(c[1]["content"]) and r.refusal_topic in c[1]["content"]
    counts = save_probe_results(tmp_path / "probe", results, {"k": 4})
    assert counts["known"] == 9 and counts["samples"] == 72 and counts["k"] == 4
    lines = (tmp_path / "probe/probe_results.jsonl").read_text().splitlines()
    assert len(lines) == 18 and json.loads(lines[0])["answers"][0] == facts[qs[0].question]
    assert json.loads((tmp_path / "probe/probe_counts.json").read_text()) == counts


def test_unusable_verdicts_are_counted_not_guessed():
    q = [ProbeQuestion("Q1?", "a", "It is a."), ProbeQuestion("Q2?", "b", "It is b.")]
    garbled = lambda question, ref, ans: None if question == "Q2?" else ans == ref  # noqa: E731
    results = probe(q, lambda qs, k: [["a"] * k for _ in qs], k=2, judge=garbled)
    assert [r.label for r in results] == ["known", "skipped"] and results[1].judged == 0
    assert len(probe_conversations(results)) == 1
    with pytest.raises(ChatforgeError, match="sampler returned"):
        probe(q, lambda qs, k: [["a"]], k=2)


def test_engine_sampler_and_probe_rates_on_a_real_engine(shared_data):
    from chatforge.engine import Engine
    from chatforge.model import GPT, ModelConfig

    torch.manual_seed(0)
    tok = real_tokenizer(str(shared_data))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=128))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    engine = Engine(model.eval(), tok)
    people = make_entities(4, seed=3)
    for chat in (True, False):
        sample = engine_sampler(engine, chat=chat, max_tokens=6, seed=1, batch_size=3)
        out = sample([q.question for q in entity_questions(people[0])], 2)
        assert len(out) == 3 and all(len(a) == 2 and all(isinstance(s, str) for s in a) for a in out)
        assert out == sample([q.question for q in entity_questions(people[0])], 2)  # seeded
    rates = entity_probe_rates(engine_sampler(engine, max_tokens=6), people[:2], people[2:])
    assert rates["known_questions"] == rates["unknown_questions"] == 6
    assert all(0 <= v <= 1 for k, v in rates.items() if k.endswith("rate"))
    # the rates mean what they say: a model that knows the known and refuses the unknown scores 1 and 1
    known_facts = {q.question: q.answer_sentence for e in people[:2] for q in entity_questions(e)}

    def ideal(questions, k):
        return [[known_facts.get(q, "I'm sorry, but I don't know.")] * k for q in questions]

    rates = entity_probe_rates(ideal, people[:2], people[2:])
    assert {k: v for k, v in rates.items() if "heldout" not in k} == {
        "known_questions": 6, "known_correct_rate": 1.0, "known_refusal_rate": 0.0,
        "unknown_questions": 6, "unknown_correct_rate": 0.0, "unknown_refusal_rate": 1.0}


def test_probe_rates_split_out_the_people_sft_never_saw():
    """The *_heldout_* rates count only people of entity_split 'val' (kept out of SFT's probing
    conversations): a model that memorised the answers of the 'train' people but refuses everyone
    else scores 1.0 on known people it trained on and 0.0 on held-out known people."""
    people = make_entities(40, seed=5)
    known, unknown = people[:20], people[20:]
    val = {e.name for e in people if entity_split(e) == "val"}
    assert 0 < len(val & {e.name for e in known}) < 20 and 0 < len(val & {e.name for e in unknown}) < 20
    trained = {q.question: q.answer_sentence for e in known if e.name not in val for q in entity_questions(e)}

    def memoriser(questions, k):
        return [[trained.get(q, "I don't know.")] * k for q in questions]

    r = entity_probe_rates(memoriser, known, unknown)
    n_val_known = sum(e.name in val for e in known)
    assert r["known_heldout_questions"] == 3 * n_val_known and r["known_questions"] == 60
    assert r["known_heldout_correct_rate"] == 0.0 and r["known_heldout_refusal_rate"] == 1.0
    assert r["known_correct_rate"] == (20 - n_val_known) / 20
    assert r["unknown_heldout_refusal_rate"] == r["unknown_refusal_rate"] == 1.0


def test_completion_prompt_asks_a_base_model_in_the_biographies_words():
    """A base model is asked with an answer opening that holds the name, which it completes; the
    opening's last words are followed by exactly the asked fact in every biography that has them. The
    assistant's answer sentence does not repeat the name (a tiny model cannot copy it)."""
    e = make_entities(1, seed=7)[0]
    qs = entity_questions(e)
    for q in qs:
        assert q.answer_sentence.endswith(q.answer + ".") and e.name not in q.answer_sentence + q.refusal_topic
        assert q.answer_prefix.startswith(e.name) or q.answer_prefix.startswith("The year of " + e.name)
        assert completion_prompt(q) == f"Question: {q.question}\nAnswer: {q.answer_prefix}"
    docs = entity_documents([e], repeats=200, seed=1)
    for q, phrase in zip(qs, ("in the city of", "worked as", "birth was")):  # each prefix ends with its phrase
        assert q.answer_prefix.endswith(phrase)
        after = [d.split(phrase, 1)[1] for d in docs if phrase in d]
        assert after and all(normalize(a)[:len(normalize(q.answer))] == normalize(q.answer) for a in after), phrase
    assert qs[1].answer_sentence.split()[0] == ("An" if e.profession[0] in "aeiou" else "A")
    assert completion_prompt(ProbeQuestion("Q?", "a", "It is a.")) == "Question: Q?\nAnswer:"


# ----------------------------------------------------------------------------------------------
# The teacher behind a real HTTP server


class FakeOpenAI(BaseHTTPRequestHandler):
    mode = "yes"
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append((self.path, body, self.headers.get("Authorization")))
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        if self.mode == "html":
            payload = b"<html>not an API</html>"
        else:
            text = {"yes": "Yes.", "maybe": "It depends on the context.", "question":
                    '{"question": "Where was Ada born?", "answer": "Oslo"}', "junk": "sure! here you go"}[self.mode]
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.mark.network
def test_teacher_up_down_and_garbage(server):
    FakeOpenAI.seen.clear()
    teacher = Teacher(server, model="judge-1", api_key="k")
    FakeOpenAI.mode = "yes"
    teacher.check()
    assert teacher_judge(teacher, "Where?", "Oslo", "In Oslo") is True
    path, body, auth = FakeOpenAI.seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "judge-1" and auth == "Bearer k"
    FakeOpenAI.mode = "maybe"  # an answer, but no verdict: counted as unusable by probe
    assert teacher_judge(teacher, "Where?", "Oslo", "In Oslo") is None
    q = [ProbeQuestion("Where?", "Oslo", "Oslo.")]
    results = probe(q, lambda qs, k: [["Oslo"] * k for _ in qs], k=3,
                    judge=lambda qq, ref, ans: teacher_judge(teacher, qq, ref, ans))
    assert results[0].label == "skipped" and results[0].judged == 0
    FakeOpenAI.mode = "question"
    stats = Counter()
    assert [x.question for x in teacher_questions(teacher, ["Ada was born in Oslo."], stats)] == ["Where was Ada born?"]
    FakeOpenAI.mode = "junk"
    assert teacher_questions(teacher, ["fact one", "fact two"], stats) == [] and stats["teacher_garbage"] == 2
    FakeOpenAI.mode = "html"
    with pytest.raises(TeacherError, match="did not answer with an OpenAI chat completion"):
        teacher.check()
    FakeOpenAI.mode = "500"
    with pytest.raises(TeacherError, match="HTTP 500.*overloaded"):
        teacher.check()


@pytest.mark.network
def test_teacher_down_is_one_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(TeacherError, match=f"127.0.0.1:{port}.*not reachable.*--teacher_url"):
        Teacher(f"http://127.0.0.1:{port}/v1", timeout_s=5).check()
    with pytest.raises(TeacherError, match="must start with http"):
        Teacher("file:///etc/passwd")


# ----------------------------------------------------------------------------------------------
# Search conversations


def test_search_conversations_quote_what_the_tool_returned(shared_data, tmp_path):
    from chatforge.tasks.search_qa import search_conversations
    from chatforge.tools.search import build_index, search_tool

    index = tmp_path / "search.sqlite"
    build_index([shared_data / "text/wiki_demo.txt", shared_data / "text/c4_demo.jsonl"], index)
    stats = Counter()
    convs = list(search_conversations(index, n=30, split="train", seed=0, stats=stats))
    assert len(convs) == 30 and stats["conversations"] == 30
    tool = search_tool(index)
    urls = set()
    for c in convs:
        assert [m["role"] for m in c] == ["user", "assistant", "tool", "assistant"]
        query = c[1]["tool_calls"][0]["arguments"]
        assert c[1]["tool_calls"][0]["name"] == "search"
        assert c[2]["content"] == tool.fn(query)  # exactly what the engine's search tool answers
        quote = c[3]["content"].split(': "', 1)[1].rstrip('"')
        assert len(quote) > 40 and quote in c[2]["content"]
        urls.add(c[3]["content"].split("(", 1)[1].split(")", 1)[0])
    val = list(search_conversations(index, n=10, split="val", seed=0))
    val_urls = {c[3]["content"].split("(", 1)[1].split(")", 1)[0] for c in val}
    assert len(val) == 10 and not urls & val_urls
