"""Evaluation (chatforge/evaluate.py, `chatforge eval`): the batched multiple-choice scorer against plain
full forwards and against `transformers` on the exported model (1e-4), the suite and bits per byte on
a tiny checkpoint with the real data files, chat tasks through the engine with scripted replies (tools
included), eval.json written task by task and resumed, and every bad input as one clear error."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.checkpoint import save_checkpoint
from chatforge.cli import main
from chatforge.common import ChatforgeError
from chatforge.engine import Engine
from chatforge import evaluate as E
from chatforge.tasks import mc, synthetic
from chatforge.corpus import iter_documents
from chatforge.tokenizer import Tokenizer
from engine_helpers import ScriptedModel, random_model

torch.set_num_threads(1)
CORPUS = ["text/tinyshakespeare.txt.gz", "text/c4_demo.jsonl", "math/gsm8k/train.jsonl"]


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shared_data) -> Path:
    """A 1024-token BPE trained on a slice of real text (with the chat special tokens)."""
    d = tmp_path_factory.mktemp("evaltok") / "tokenizer"
    Tokenizer.train(iter_documents(CORPUS, str(shared_data), 10_000, 400_000), vocab_size=1024).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def _ckpt(path: Path, tok_dir: Path, stage: str, seed: int = 0, max_seq_len: int = 256) -> Path:
    model = random_model(1024, seed=seed, max_seq_len=max_seq_len, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    return save_checkpoint(path, model, tokenizer_dir=tok_dir, meta={"stage": stage, "step": 7})


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tok_dir, shared_data) -> Path:
    """runs/r with a base checkpoint (random weights, stage pretrain), an sft checkpoint, and the
    pretrain stage's token shards (held-out split) as the pretrain stage leaves them."""
    from chatforge.dataloader import build_token_shards

    root = tmp_path_factory.mktemp("evalruns") / "runs"
    _ckpt(root / "r" / "pretrain" / "checkpoint", tok_dir, "pretrain")
    _ckpt(root / "r" / "sft" / "checkpoint", tok_dir, "sft", seed=1)
    build_token_shards(root / "r" / "pretrain" / "tokens", Tokenizer.load(tok_dir), ["text/tinyshakespeare.txt.gz"],
                       data_dir=str(shared_data), max_chars=200_000, val_fraction=0.1, log=lambda *a: None)
    return root


def full_forward_scores(model, tokens, start):
    """Reference: one full forward of one choice, no cache, no padding."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tokens]))[0].double(), -1)
    picks = [lp[j - 1, tokens[j]].item() for j in range(start, len(tokens))]
    greedy = all(int(lp[j - 1].argmax()) == tokens[j] for j in range(start, len(tokens)))
    return sum(picks), greedy


# ----------------------------------------------------------------------------------------------
# The batched scorer


def test_score_continuations_equals_full_forwards():
    """Shared contexts, different context lengths in one group (left padding), schema-like questions
    whose contexts differ, single-choice questions, groups split by batch_rows: every log-likelihood
    equals the one-choice full forward."""
    model = random_model(97, seed=3, n_layer=2, max_seq_len=64)
    rng = random.Random(0)
    questions = []
    for _ in range(9):
        n = rng.randint(2, 30)
        context = [rng.randrange(97) for _ in range(n)]
        questions.append([(context + [rng.randrange(97) for _ in range(rng.randint(1, 12))], n)
                          for _ in range(rng.randint(1, 4))])
    questions.append([([5, 6, 7, 8, 9, 10], 4), ([5, 6, 11, 8, 9, 10], 4)])  # schema: same continuation
    questions.append([([1, 2, 3], 1)])
    for rows in (1, 3, 8, 64):
        got = E.score_continuations(model, questions, batch_rows=rows)
        for q, scores in zip(questions, got):
            for (t, s), sc in zip(q, scores):
                ref, greedy = full_forward_scores(model, t, s)
                assert abs(sc.logprob - ref) < 1e-4 and sc.greedy == greedy and sc.tokens == len(t) - s


def test_score_continuations_keeps_groups_inside_the_context():
    """A long-context question and a long-continuation question never share a group whose cache
    would exceed the context (the model would refuse it); both still score exactly."""
    model = random_model(50, seed=4, n_layer=1, max_seq_len=32)
    a = [(list(range(1, 29)) + [3, 4], 28)]  # 28-token context, 2-token continuation
    b = [([1, 2] + list(range(5, 33)), 2)]  # 2-token context, 28-token continuation
    got = E.score_continuations(model, [a, b], batch_rows=8)
    for q, sc in zip([a, b], got):
        assert abs(sc[0].logprob - full_forward_scores(model, *q[0])[0]) < 1e-4
    with pytest.raises(ValueError, match="context 32"):
        E.score_continuations(model, [[(list(range(40)), 3)]])


def test_encode_item_fits_the_context(tok):
    """Few-shot examples are dropped until the question fits; the scored continuation is the choice."""
    arc = mc.CORE_TASKS["arc_easy"]
    shots = [mc.MCItem(query=f"Question: example {i} " + "word " * 30, choices=["x", "y"], gold=0) for i in range(10)]
    item = mc.MCItem(query="Question: what color is the sky?", choices=["blue", "green"], gold=0)
    choices, used, cropped = E.encode_item(tok, arc, item, shots, ctx=128)
    assert 0 < used < 10 and not cropped and all(len(t) <= 128 for t, _ in choices)
    (t0, s0), (t1, s1) = choices
    assert s0 == s1 and t0[:s0] == t1[:s1] and t0[0] == tok.bos_id
    assert tok.decode(t0[s0:]) == " blue" and tok.decode(t0[1:s0]).endswith("the sky?\nAnswer:")
    long_item = mc.MCItem(query="Question: " + "long " * 200, choices=["a", "b"], gold=0)
    choices, used, cropped = E.encode_item(tok, arc, long_item, [], ctx=64)
    assert cropped and used == 0 and all(len(t) == 64 or len(t) == 63 for t, _ in choices)
    with pytest.raises(ValueError):
        E.encode_item(tok, arc, mc.MCItem(query="q", choices=["word " * 100], gold=0), [], ctx=32)


def test_scores_match_transformers_on_the_exported_checkpoint(tmp_path, tok_dir, tok, shared_data):
    """The issue's check: for the exported checkpoint loaded in transformers, the per-choice
    log-likelihoods of our harness (real ARC-Easy questions, 3-shot) equal the ones computed directly
    with transformers to 1e-4."""
    transformers = pytest.importorskip("transformers")
    from chatforge.export import export_hf

    ck = _ckpt(tmp_path / "ckpt", tok_dir, "pretrain", seed=5, max_seq_len=512)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ck, tmp_path / "hf"), dtype=torch.float32).eval()
    model = random_model(1024, seed=5, max_seq_len=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    task = mc.CORE_TASKS["arc_easy"]
    items, _ = mc.load_core_items(task, str(shared_data))
    questions = []
    for i in range(12):
        fewshot = [items[k] for k in mc.sample_fewshot(len(items), i, 3, seed=0)]
        questions.append(E.encode_item(tok, task, items[i], fewshot, 512)[0])
    ours = E.score_continuations(model, questions, batch_rows=16)
    worst = 0.0
    with torch.no_grad():
        for q, scores in zip(questions, ours):
            for (tokens, start), sc in zip(q, scores):
                logits = hf(torch.tensor([tokens])).logits[0].double()  # (T, V)
                lp = torch.log_softmax(logits[start - 1:-1], -1)
                theirs = lp.gather(-1, torch.tensor(tokens[start:])[:, None]).sum().item()
                worst = max(worst, abs(theirs - sc.logprob))
    assert worst < 1e-4, worst


# ----------------------------------------------------------------------------------------------
# Base-model suite and bits per byte


def test_core_task_on_a_checkpoint_with_real_data(tok, shared_data):
    """ARC-Easy, 10-shot, 6 questions: the prediction is the choice with the best mean log-prob per
    token (recomputed here from one-choice full forwards), centred with DCLM's baseline; seeded."""
    model = random_model(1024, seed=2, max_seq_len=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    meta = mc.read_core_meta(str(shared_data))
    task = mc.CORE_TASKS["arc_easy"]
    res = E.run_core_task(model, tok, task, meta, data_dir=str(shared_data), limit=6, seed=3, batch_rows=8,
                          progress=False)
    assert res["status"] == "ok" and res["n"] == 6 and res["shots"] == 10 and 0 < res["shots_used"] <= 10
    items, _ = mc.load_core_items(task, str(shared_data))
    correct = 0
    for i in E._subsample(len(items), 6, 3):
        fewshot = [items[k] for k in mc.sample_fewshot(len(items), i, 10, 3)]
        choices, _, _ = E.encode_item(tok, task, items[i], fewshot, 256)
        means = [full_forward_scores(model, t, s)[0] / (len(t) - s) for t, s in choices]
        correct += int(np.argmax(means) == items[i].gold)
    assert res["accuracy"] == correct / 6
    assert res["centered"] == pytest.approx((correct / 6 - 0.25) / 0.75)
    again = E.run_core_task(model, tok, task, meta, data_dir=str(shared_data), limit=6, seed=3, batch_rows=3,
                            progress=False)
    assert again["accuracy"] == res["accuracy"]


def test_lambada_is_exact_greedy_match(tok, shared_data):
    """A LAMBADA item counts only when greedy decoding reproduces every continuation token."""
    model = random_model(1024, seed=2, max_seq_len=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    task = mc.CORE_TASKS["lambada_openai"]
    res = E.run_core_task(model, tok, task, mc.read_core_meta(str(shared_data)), data_dir=str(shared_data),
                          limit=5, progress=False)
    items, _ = mc.load_core_items(task, str(shared_data))
    expect = sum(full_forward_scores(model, *E.encode_item(tok, task, items[i], [], 256)[0][0])[1]
                 for i in E._subsample(len(items), 5, 1337))
    assert res["accuracy"] == expect / 5


def test_core_summary():
    tasks = {"arc_easy": {"status": "ok", "centered": 0.2}, "copa": {"status": "ok", "centered": -0.1},
             "hellaswag": {"status": "missing", "reason": "x"}, "bpb": {"status": "ok", "bpb": 1.0}}
    s = E.core_summary(tasks)
    assert s["score"] == pytest.approx(0.05) and s["missing"] == ["hellaswag"] and not s["complete"]
    assert E.core_summary({"bpb": {"status": "ok"}}) is None


def test_bpb_equals_the_definition(run_root, tok):
    """Bits per byte on the run's held-out split = sum of per-token losses / ln 2 / UTF-8 bytes of the
    targets (special tokens count in neither), on the first windows; plus the unigram baseline."""
    from chatforge.checkpoint import load_checkpoint
    from chatforge.dataloader import TokenStream, read_index

    model, _ = load_checkpoint(run_root / "r" / "pretrain" / "checkpoint")
    tokens_dir = run_root / "r" / "pretrain" / "tokens"
    res = E.run_bpb(model, tok, tokens_dir=tokens_dir, max_tokens=2048, batch_size=3)
    stream = TokenStream(tokens_dir, read_index(tokens_dir), "val")
    nbytes = np.asarray(tok.token_bytes())
    bits = total = 0.0
    for w in range(2048 // 256):
        win = torch.from_numpy(stream.window(w * 256, 257))[None]  # (1, 257)
        with torch.no_grad():
            loss = model(win[:, :-1], win[:, 1:], loss_reduction="none")[0].double()
        win = win[0].numpy()
        b = nbytes[win[1:]]
        bits += float((loss.numpy() * (b > 0)).sum()) / np.log(2)
        total += float(b.sum())
    assert res["status"] == "ok" and res["tokens"] == 2048
    assert res["bpb"] == pytest.approx(bits / total, rel=1e-6)
    assert res["unigram_bpb"] > 0
    text = E.run_bpb(model, tok, tokens_dir=None, texts=["text/c4_demo.jsonl"], max_tokens=1024, batch_size=4)
    assert text["status"] == "ok" and "unigram_bpb" not in text and text["source"] == "text/c4_demo.jsonl"
    missing = E.run_bpb(model, tok, tokens_dir=run_root / "nope", max_tokens=1024, batch_size=4)
    assert missing["status"] == "missing" and "--bpb_text" in missing["reason"]


# ----------------------------------------------------------------------------------------------
# Chat tasks through the engine


def scripted_engine(tok, reply: str | list[int], max_seq_len: int = 2048) -> Engine:
    sp = tok.special_tokens
    script = (tok.encode(reply) + [sp["<|assistant_end|>"]]) if isinstance(reply, str) else reply
    model = ScriptedModel(script, tok.vocab_size, sp["<|output_start|>"], sp["<|output_end|>"], max_seq_len)
    return Engine(model, tok, tools=E._eval_tools(5.0))


@pytest.mark.parametrize("task, reply, correct", [
    ("gsm8k", "She makes 9 * 2 = 18 dollars.\n#### 18", 1),
    ("gsm8k", "The answer is 17.", 0),
    ("svamp", "76 - 25 = 51", 1),
    ("math500", r"The polar form is $\boxed{\left(3, \frac{\pi}{2}\right)}$.", 1),
    ("math500", r"$\boxed{(3, \pi)}$", 0),
    ("chat_arc_easy", "A", 1),  # ARC-Easy test item 0: "Sunlight is the source of energy ..."
    ("chat_arc_easy", "The answer is (B).", 0),
])
def test_generation_tasks_with_hand_written_replies(tok, shared_data, task, reply, correct):
    """The whole chat-task path -- load, render the chat prompt, generate through the engine, extract,
    check -- on item 0 of each dataset with a model scripted to give a known reply."""
    t = E.TASKS[task]
    items = E._load_chat_items(t, str(shared_data))[:1]
    res = E.run_generation_task(scripted_engine(tok, reply), t, items, batch_size=1, max_tokens=128, progress=False)
    assert (res["status"], res["n"], res["correct"]) == ("ok", 1, correct)
    assert res["examples"][0]["reply"] == reply and res["examples"][0]["correct"] == bool(correct)


def test_humaneval_reply_runs_in_the_sandbox(tok, shared_data):
    t = E.TASKS["humaneval"]
    items = E._load_chat_items(t, str(shared_data))[:1]
    good = "```python\n" + items[0]["prompt"] + items[0]["canonical_solution"] + "```"
    res = E.run_generation_task(scripted_engine(tok, good), t, items, batch_size=1, max_tokens=600, progress=False)
    assert res["correct"] == 1
    bad = E.run_generation_task(scripted_engine(tok, "```python\ndef has_close_elements(n, t):\n    return True\n```"),
                                t, items, batch_size=1, max_tokens=100, progress=False)
    assert bad["correct"] == 0 and "AssertionError" in bad["examples"][0]["extracted"]


def test_tools_variant_calls_the_python_sandbox(tok, shared_data):
    """math500_tools lets the model call python: the engine runs the call, feeds the output back, and
    the reply after it is what gets checked; the plain variant does not run tools."""
    sp = tok.special_tokens
    script = ([sp["<|python_start|>"]] + tok.encode("print((3**2)**0.5)") + [sp["<|python_end|>"]]
              + tok.encode(r" so $\boxed{(3, \frac{\pi}{2})}$") + [sp["<|assistant_end|>"]])
    items = E._load_chat_items(E.TASKS["math500_tools"], str(shared_data))[:1]
    res = E.run_generation_task(scripted_engine(tok, script), E.TASKS["math500_tools"], items, batch_size=1,
                                max_tokens=128, progress=False)
    assert res["tool_calls"] == 1 and res["correct"] == 1 and res["tools"]
    plain = E.run_generation_task(scripted_engine(tok, script), E.TASKS["math500"], items, batch_size=1,
                                  max_tokens=128, progress=False)
    assert plain["tool_calls"] == 0


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_probes_use_the_held_out_synthetic_problems(tok, kind):
    """Each weak-spot probe asks chatforge.tasks.synthetic's held-out ('val') problems of its kind (none
    of them among the training problems) and grades with its check_answer: the right answer stated is
    correct, a wrong one is not; the `_tools` variant runs the python call and grades the reply after it."""
    name = next(n for n, _, k in E.PROBES if k == kind)
    t, tt = E.TASKS[f"probe_{name}"], E.TASKS[f"probe_{name}_tools"]
    items = E._probe_items(t, 5, seed=9)
    assert [it["question"] for it in items] == [p.prompt for p in synthetic.make_problems(kind, 5, "val", 9)]
    train = {p.prompt for p in synthetic.make_problems(kind, 400, "train", 9)}
    assert not train & {it["question"] for it in items}
    assert items[0]["messages"] == [{"role": "user", "content": items[0]["question"]}]
    first = items[:1]
    right = E.run_generation_task(scripted_engine(tok, f"The answer is {first[0]['answer']}."), t, first,
                                  batch_size=1, max_tokens=64, progress=False)
    wrong = E.run_generation_task(scripted_engine(tok, "The answer is 7xq."), t, first, batch_size=1,
                                  max_tokens=64, progress=False)
    assert (right["correct"], wrong["correct"]) == (1, 0)
    problem = synthetic.make_problems(kind, 1, "val", 9)[0]
    sp = tok.special_tokens
    # the call as SFT teaches it (the python tool shows the last expression's value, as a REPL does)
    script = ([sp["<|python_start|>"]] + tok.encode(problem.code) + [sp["<|python_end|>"]]
              + tok.encode(f" The answer is {problem.answer}.") + [sp["<|assistant_end|>"]])
    tools = E.run_generation_task(scripted_engine(tok, script), tt, first, batch_size=1, max_tokens=96,
                                  progress=False)
    assert tools["tool_calls"] == 1 and tools["correct"] == 1 and tools["tools"]


def _reply_all(tok, task: str, items: list[dict], reply: str) -> dict:
    return E.run_generation_task(scripted_engine(tok, reply), E.TASKS[task], items, batch_size=1, max_tokens=64,
                                 progress=False)


def test_identity_probe_with_scripted_replies(tok, shared_data):
    """The identity probe asks held-out phrasings only (none occurs in identity.py's training
    conversations), with and without a system prompt giving another identity, and counts a reply
    right when it names who it should be (and its maker when asked who made it)."""
    from chatforge.tasks import identity

    card = identity.IdentityCard(name="Orion", maker="Northwind Labs")
    items = E._identity_items(card, str(shared_data), seed=0)
    trained = {m["content"] for conv in identity.identity_conversations(card, 400, "train", 0, str(shared_data))
               for m in conv if m["role"] == "user"}
    assert items and not trained & {it["question"] for it in items}
    plain = [it for it in items if it["messages"][0]["role"] == "user"]
    override = [it for it in items if it["messages"][0]["role"] == "system"]
    asks_maker = sum(bool(it["maker"]) for it in plain)
    assert override and 0 < asks_maker < len(plain)
    full = _reply_all(tok, "probe_identity", plain, "I'm Orion, an AI assistant made by Northwind Labs.")
    name_only = _reply_all(tok, "probe_identity", plain, "My name is Orion.")
    other = _reply_all(tok, "probe_identity", plain, "I am ChatGPT, made by OpenAI.")
    assert (full["correct"], other["correct"]) == (len(plain), 0)
    assert name_only["correct"] == sum(not it["maker"] for it in plain)
    assert _reply_all(tok, "probe_identity", override, "I'm Orion, made by Northwind Labs.")["correct"] == 0
    sys_item = override[0]
    follows = f"I am {sys_item['name']}, built by {sys_item['maker'] or 'someone'}."
    assert _reply_all(tok, "probe_identity", [sys_item], follows)["correct"] == 1
    # the card: SFT config's identity table or identity_<field> entries, else the defaults
    assert E.identity_card({"identity": {"name": "Ada", "maker": "Acme"}, "lr": 1}).name == "Ada"
    assert E.identity_card({"identity_maker": "Acme"}).maker == "Acme"
    assert E.identity_card(None) == identity.IdentityCard()


def test_hallucination_probes_with_scripted_replies(tok, tmp_path):
    """Withheld fictional people should be refused, people whose biographies were in pretraining
    answered (probing.normalized_match), well-known facts answered; the refusal rate is kept apart.
    Scores agree with probing.entity_probe_rates on the same replies."""
    from chatforge.tasks import probing

    known, unknown = probing.split_known(probing.make_entities(20, seed=3), 0.5, seed=3)
    facts = tmp_path / "facts.jsonl"
    probing.write_facts(facts, known, unknown)
    withheld = E._entity_items(E.TASKS["probe_fictional"], facts, 12, seed=0)
    assert len(withheld) == 12 and all(any(e.name in it["question"] for e in unknown) for it in withheld)
    refuse = _reply_all(tok, "probe_fictional", withheld, "I'm sorry, but I don't know who that is.")
    invent = _reply_all(tok, "probe_fictional", withheld, "She was born in Lisbon in 1901 and was a potter.")
    assert (refuse["accuracy"], refuse["refusal_rate"], invent["accuracy"], invent["refusal_rate"]) == (1, 1, 0, 0)
    assert set(refuse["groups"]) <= {"heldout", "sft"} and sum(g["n"] for g in refuse["groups"].values()) == 12
    person = known[0]
    city = [it for it in E._entity_items(E.TASKS["probe_fictional_known"], facts, 0, 0)
            if it["question"] == f"Where was {person.name} born?"]
    assert _reply_all(tok, "probe_fictional_known", city, f"{person.name} was born in {person.birth_city}.")["correct"] == 1
    wrong_city = next(c for c in probing.CITIES if c != person.birth_city)
    assert _reply_all(tok, "probe_fictional_known", city, f"In {wrong_city}.")["correct"] == 0
    declined = _reply_all(tok, "probe_fictional_known", city, "I'm not sure.")
    assert (declined["correct"], declined["refusal_rate"]) == (0, 1)
    with pytest.raises(ChatforgeError, match="no facts file"):
        E._entity_items(E.TASKS["probe_fictional_known"], None, 5, 0)
    invented = E._entity_items(E.TASKS["probe_fictional"], None, 7, 0)  # no facts file: made-up people, withheld
    assert len(invented) == 7 and "group" not in invented[0]
    france = [it for it in E._fact_items() if it["question"] == "What is the capital of France?"]
    water = [it for it in E._fact_items() if "freezing point" in it["question"]]
    assert _reply_all(tok, "probe_known_facts", france, "The capital of France is Paris.")["correct"] == 1
    assert _reply_all(tok, "probe_known_facts", france, "It is Lyon.")["correct"] == 0
    assert _reply_all(tok, "probe_known_facts", water, "Water freezes at zero degrees.")["correct"] == 1
    # the same replies scored by tasks.probing's own rates
    rng = random.Random(5)
    script = {}
    for e in known + unknown:
        for q in probing.entity_questions(e):
            script[q.question] = rng.choice(["I don't know.", f"It was {q.answer}.", "It was 1850 in Oslo."])
    rates = probing.entity_probe_rates(lambda qs, k: [[script[q]] for q in qs], known, unknown)
    for task, key in (("probe_fictional", "unknown_refusal_rate"), ("probe_fictional_known", "known_correct_rate")):
        items = E._entity_items(E.TASKS[task], facts, 0, 0)
        got = [E.check_reply(E.TASKS[task], it, script[it["question"]])[0] for it in items]
        assert sum(got) / len(got) == pytest.approx(rates[key])


def test_batched_generation_on_a_chat_checkpoint(run_root, tmp_path, shared_data):
    """A random-weight chat checkpoint through evaluate_checkpoint: batched greedy generation for the
    chat tasks, the base suite too, a weak-spot probe; eval.json complete."""
    out = tmp_path / "eval.json"
    res = E.evaluate_checkpoint(run_root / "r" / "sft" / "checkpoint",
                                ["gsm8k", "chat_arc_easy", "copa", "probe_spelling", "probe_identity",
                                 "probe_fictional", "probe_fictional_known", "probe_known_facts"], out,
                                data_dir=str(shared_data), limit=3, batch_size=3, max_tokens=6, progress=False,
                                log=lambda s: None)
    t = res["tasks"]
    assert res["chat"] and res["complete"] and json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert t["gsm8k"]["n"] == 3 and t["chat_arc_easy"]["n"] == 3 and t["copa"]["n"] == 3
    assert t["probe_spelling"]["status"] == "ok" and t["probe_spelling"]["n"] == 3
    assert all(t[n]["status"] == "ok" and t[n]["n"] == 3 for n in ("probe_identity", "probe_fictional", "probe_known_facts"))
    assert t["probe_fictional_known"]["status"] == "missing" and "no facts file" in t["probe_fictional_known"]["reason"]
    assert res["settings"]["identity"] == {"name": "chatforge", "maker": "the chatforge project"}
    assert all(len(ex["reply"]) > 0 for ex in t["gsm8k"]["examples"])


# ----------------------------------------------------------------------------------------------
# eval.json: incremental, resumable, strict


def test_eval_json_is_written_per_task_and_resumed(run_root, tmp_path, shared_data, monkeypatch):
    ck = run_root / "r" / "pretrain" / "checkpoint"
    out = tmp_path / "eval.json"
    kw = dict(data_dir=str(shared_data), limit=4, tokens_dir=run_root / "r" / "pretrain" / "tokens",
              bpb_tokens=1024, progress=False)
    real = E.run_core_task

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "run_core_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate_checkpoint(ck, ["bpb", "copa"], out, log=lambda s: None, **kw)
    partial = E.read_eval(out)
    assert list(partial["tasks"]) == ["bpb"] and not partial["complete"]
    monkeypatch.setattr(E, "run_core_task", real)
    lines = []
    done = E.evaluate_checkpoint(ck, ["bpb", "copa"], out, log=lines.append, **kw)
    assert "eval: bpb: kept from" in lines[0] and done["complete"]
    assert done["tasks"]["bpb"] == partial["tasks"]["bpb"] and done["core"]["tasks"] == ["copa"]
    lines.clear()
    E.evaluate_checkpoint(ck, ["bpb"], out, log=lines.append, **{**kw, "limit": 5})  # other settings: redone
    assert not any("kept" in s for s in lines)


def test_read_eval_errors(tmp_path):
    p = tmp_path / "eval.json"
    with pytest.raises(ChatforgeError, match="not found"):
        E.read_eval(p)
    p.write_text('{"format": 1, "tasks": {"bpb": ')
    with pytest.raises(ChatforgeError, match="not valid JSON.*rerun `chatforge eval`"):
        E.read_eval(p)
    p.write_text('{"hello": 1}')
    with pytest.raises(ChatforgeError, match="not a chatforge eval file"):
        E.read_eval(p)


def test_task_names_and_chat_protocol(run_root, tok, tmp_path):
    with pytest.raises(ChatforgeError, match=r"(?s)unknown eval task 'nope'.*\nbase: bpb, hellaswag"):
        E.resolve_tasks(["nope"], chat=True)
    assert [t.name for t in E.resolve_tasks([], chat=False)] == E.GROUPS["base"]
    assert [t.name for t in E.resolve_tasks(["all"], chat=True)] == E.GROUPS["all"]
    # one list for every checkpoint of a run: a base model leaves its chat tasks out, unless none is left
    assert [t.name for t in E.resolve_tasks(["bpb", "gsm8k", "probes"], chat=False)] == ["bpb"]
    assert [t.name for t in E.resolve_tasks(["bpb", "gsm8k"], chat=True)] == ["bpb", "gsm8k"]
    with pytest.raises(ChatforgeError, match="probe_identity.*need a chat model"):
        E.resolve_tasks(["probes"], chat=False)
    assert E.chat_protocol({"stage": "sft"}, tok) == (True, "")
    ok, why = E.chat_protocol({"stage": "pretrain"}, tok)
    assert not ok and "base model" in why
    bare = types.SimpleNamespace(special_tokens={"<|bos|>": 1})
    assert "without the chat protocol's <|user_start|>" in E.chat_protocol({"stage": "sft"}, bare)[1]
    with pytest.raises(ChatforgeError, match=r"(?s)gsm8k need a chat model.*base model.*Tasks it can run: bpb"):
        E.evaluate_checkpoint(run_root / "r" / "pretrain" / "checkpoint", ["gsm8k"], tmp_path / "e.json",
                              progress=False)


# ----------------------------------------------------------------------------------------------
# The stage: `chatforge eval`


def test_eval_command(run_root, shared_data, capsys):
    base = ["--run", "r", "--runs_dir", str(run_root), "--data_dir", str(shared_data), "--threads", "1"]
    assert main(["eval", "pretrain", *base, "--tasks", "bpb,copa", "--limit", "3", "--bpb_tokens", "1024"]) == 0
    out = run_root / "r" / "eval" / "base"
    ev = E.read_eval(out / "eval.json")
    assert ev["complete"] and set(ev["tasks"]) == {"bpb", "copa"} and ev["label"] == "base"
    assert (out / "DONE").exists() and (out / "meta.json").exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["task"] == "bpb"
    capsys.readouterr()
    assert main(["evaluate", "pretrain", *base, "--tasks", "copa,piqa", "--limit", "3", "--bpb_tokens", "1024"]) == 0
    assert "copa: kept from" in capsys.readouterr().out  # a rerun adds piqa, keeps the rest
    assert set(E.read_eval(out / "eval.json")["tasks"]) == {"bpb", "copa", "piqa"}
    assert main(["eval", "pretrain", *base, "--tasks", "gsm8k"]) == 2
    assert "need a chat model" in capsys.readouterr().err
    assert main(["eval", *base, "--tasks", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown eval task 'nope'" in err and "chat: gsm8k" in err
    assert main(["eval", "rl", *base]) == 2
    assert "has no rl checkpoint" in capsys.readouterr().err
    assert main(["eval", "--run", "nothing", "--runs_dir", str(run_root)]) == 2
    assert "has no checkpoints yet" in capsys.readouterr().err
    assert main(["eval", "--tasks", "list"]) == 0
    assert "probes: probe_letter_count" in capsys.readouterr().out


def test_eval_command_reads_the_identity_card_and_facts(tmp_path, tok_dir, shared_data):
    """The stage hands the sft stage's identity card and the facts stage's file to the probes."""
    from chatforge.tasks import probing

    run = tmp_path / "runs" / "q"
    _ckpt(run / "sft" / "checkpoint", tok_dir, "sft")
    (run / "sft" / "config.json").write_text(json.dumps({"identity": {"name": "Kestrel", "maker": "Acme"}}))
    known, unknown = probing.split_known(probing.make_entities(6, seed=1), 0.5, seed=1)
    (run / "facts").mkdir()
    probing.write_facts(run / "facts" / "facts.jsonl", known, unknown)
    args = ["eval", "sft", "--run", "q", "--runs_dir", str(tmp_path / "runs"), "--data_dir", str(shared_data),
            "--threads", "1", "--tasks", "probe_identity,probe_fictional_known", "--limit", "2", "--max_tokens", "4"]
    assert main(args) == 0
    ev = E.read_eval(run / "eval" / "sft" / "eval.json")
    assert ev["settings"]["identity"] == {"name": "Kestrel", "maker": "Acme"}
    assert ev["tasks"]["probe_fictional_known"]["n"] == 2 and "groups" in ev["tasks"]["probe_fictional_known"]
    (run / "sft" / "config.json").write_text("{not json")
    assert main(args) == 2


def test_missing_data_is_reported_not_faked(run_root, tmp_path, shared_data):
    """A suite file or DCLM's table absent from the data dir: the task is recorded as missing with
    the way to fetch it, and CORE is over the tasks that ran (never a made-up number)."""
    ck = run_root / "r" / "pretrain" / "checkpoint"
    res = E.evaluate_checkpoint(ck, ["copa"], tmp_path / "a.json", data_dir=str(tmp_path), progress=False,
                                log=lambda s: None)
    assert res["tasks"]["copa"]["status"] == "missing" and res["core"] is None
    assert "chatforge data download core_meta" in res["tasks"]["copa"]["reason"]
    meta = tmp_path / "d" / "eval" / "core_meta"
    meta.mkdir(parents=True)
    (meta / "eval_meta_data.csv").write_bytes((shared_data / "eval/core_meta/eval_meta_data.csv").read_bytes())
    (tmp_path / "d" / "eval" / "piqa").mkdir()
    (tmp_path / "d" / "eval" / "piqa" / "piqa.jsonl").write_bytes((shared_data / "eval/piqa/piqa.jsonl").read_bytes())
    res = E.evaluate_checkpoint(ck, ["copa", "piqa"], tmp_path / "b.json", data_dir=str(tmp_path / "d"), limit=2,
                                progress=False, log=lambda s: None)
    assert "`chatforge data download copa`" in res["tasks"]["copa"]["reason"]
    assert res["core"]["tasks"] == ["piqa"] and res["core"]["missing"] == ["copa"] and not res["core"]["complete"]
