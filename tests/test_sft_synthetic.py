"""Weak-spot tasks (chatforge/tasks/synthetic.py) and identity conversations (chatforge/tasks/identity.py):
answers checked independently, tool outputs checked against the real python sandbox, disjoint held-out
splits, checkers that accept right answers and refuse wrong ones."""

from __future__ import annotations

import re

import pytest

from chatforge.common import ChatforgeError
from chatforge.tasks.identity import IdentityCard, identity_conversations, llama_factory_pairs
from chatforge.tasks.synthetic import (KINDS, WORDS, check_answer, extract_answer, make_problems,
                                       synthetic_conversations, words)
from sft_helpers import real_tokenizer


def test_problems_are_deterministic_and_answers_are_right():
    for kind in KINDS:
        a, b = make_problems(kind, 300, "train", seed=3), make_problems(kind, 300, "train", seed=3)
        assert a == b and len(a) == 300 and {p.kind for p in a} == {kind}
        assert make_problems(kind, 50, "train", seed=4) != a[:50]
        for p in a:  # recompute every answer from the prompt, independently of the generator
            if kind == "letter_count":
                shown, letter = re.fullmatch(r"word = ['\"] ?(\w+)['\"]\nword\.lower\(\)\.count\('(.)'\)", p.code).groups()
                assert re.search(rf"\b{shown}\b", p.prompt) and re.search(rf"\b{letter}\b", p.prompt)
                assert p.answer == str(sum(c == letter for c in shown.lower()))
            elif kind == "spelling":
                word = p.answer.replace("-", "")
                assert word in p.prompt and p.answer == "-".join(list(word))
            elif kind == "reverse":
                word = p.answer[::-1]
                assert word in p.prompt
            elif kind == "decimal_compare":
                a_, b_ = re.findall(r"\d+\.\d+", p.prompt)
                want = max if "smaller" not in p.prompt else min
                assert float(p.answer) == want(float(a_), float(b_)) and p.answer in (a_, b_)
            else:
                x, op, y = re.search(r"(\d+) (\+|-|\*|plus|minus|times) (\d+)", p.prompt).groups()
                x, y = int(x), int(y)
                assert int(p.answer) == {"+": x + y, "plus": x + y, "-": x - y, "minus": x - y}.get(op, x * y)


def test_the_code_repeats_the_word_in_the_prompts_own_tokens(shared_data):
    """The python call copies the asked word token for token (the tiny model copies tokens, not letters):
    the word's tokens in the prompt, quotes and leading space included, reappear in the code, for bare,
    'single' and "double" quoted prompts. Without the fix ('strawberry' at the start of the code) the
    gpt4 pattern splits "'s|t|raw|ber|ry" against the prompt's " straw|ber|ry"."""
    tok = real_tokenizer(str(shared_data))
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text)]
    seen_quotes = set()
    for kind in ("letter_count", "spelling", "reverse"):
        for p in make_problems(kind, 60, "val") + make_problems(kind, 60, "train"):
            literal = re.match(r"word = (['\"] ?\w+['\"])\n", p.code).group(1)
            word = literal.strip("'\" ")
            quote = "" if literal.startswith("' ") else literal[0]
            seen_quotes.add(quote)
            asked = (" " + word) if not quote else (" " + quote + word)
            want = pieces(asked)  # the word as the prompt tokenizes it (after its space or " '")
            assert asked in p.prompt and "".join(want) == asked
            code = pieces(p.code)
            assert any(code[i:i + len(want)] == want for i in range(len(code))), (p.prompt, want, code)
    assert seen_quotes == {"", "'", '"'}
    # why: the former code ('strawberry'.lower()...) began with "'s", a contraction, so its tokens differed
    assert pieces("'strawberry")[0] == "'s" and pieces(" strawberry")[0] != "'s"


def test_held_out_splits_are_disjoint():
    train_words, val_words = set(words("train")), set(words("val"))
    assert not train_words & val_words and train_words | val_words == set(WORDS) and len(val_words) > 40
    for kind in ("spelling", "reverse"):
        for p in make_problems(kind, 200, "val"):
            word = p.answer.replace("-", "") if kind == "spelling" else p.answer[::-1]
            assert word in val_words
    for kind in ("arithmetic", "decimal_compare"):
        train = {p.code for p in make_problems(kind, 2000, "train")}
        val = {p.code for p in make_problems(kind, 500, "val")}
        assert len(val) == 500 and not train & val


def test_training_words_are_half_invented_and_never_held_out_words():
    """Half of the training split's word problems use invented words (so copying, not recall, fits
    them); none is a real word of the list, so held-out words stay unseen; val uses real words only."""
    import random

    from chatforge.tasks.synthetic import invented_word

    val_words = set(words("val"))
    for kind in ("letter_count", "spelling", "reverse"):
        train = make_problems(kind, 400, "train", seed=2)
        used = [p.answer.replace("-", "") if kind == "spelling" else p.answer[::-1] if kind == "reverse"
                else re.match(r"word = ['\"] ?(\w+)", p.code).group(1).lower() for p in train]
        invented = [w for w in used if w not in WORDS]
        assert 0.4 < len(invented) / len(used) < 0.6 and len(set(invented)) > 150, kind
        assert not set(used) & val_words
    rng = random.Random(0)
    made = [invented_word(rng) for _ in range(5000)]
    assert not set(made) & set(WORDS) and all(w.isalpha() and w.islower() and 3 <= len(w) <= 14 for w in made)


def test_tool_outputs_match_the_python_sandbox():
    from chatforge.tools.python_sandbox import run_python

    for kind in KINDS:
        for p in make_problems(kind, 3, "val", seed=1):
            assert run_python(p.code).text() == p.output, (kind, p.code)


def test_checkers_accept_right_and_refuse_wrong_answers():
    assert check_answer("letter_count", "Let me count... The answer is 3.", "3")
    assert check_answer("letter_count", "There are 3 r's in strawberry.", "3")  # no phrase: the last number
    assert not check_answer("letter_count", "The answer is 2.", "3")
    assert check_answer("arithmetic", "The answer is 1,913,937.", "1913937")
    assert check_answer("arithmetic", "The answer is -42", "-42") and not check_answer("arithmetic", "The answer is 42", "-42")
    assert check_answer("decimal_compare", "9.9 is bigger. The answer is 9.9.", "9.9")
    assert not check_answer("decimal_compare", "9.11 has more digits. The answer is 9.11.", "9.9")
    assert check_answer("decimal_compare", "The answer is **9.90**", "9.9")
    assert check_answer("spelling", "The answer is s-k-y.", "s-k-y") and check_answer("spelling", "answer is S K Y", "s-k-y")
    assert not check_answer("spelling", "The answer is sky.", "s-k-y") and not check_answer("spelling", "s-k-y", "s-k-y")
    assert check_answer("reverse", "The answer is \"yks\".", "yks") and not check_answer("reverse", "The answer is sky.", "yks")
    assert extract_answer("no phrase here") is None
    with pytest.raises(ChatforgeError, match="unknown synthetic task"):
        check_answer("sudoku", "x", "y")
    with pytest.raises(ChatforgeError, match="unknown synthetic task"):
        make_problems("sudoku", 1)


def test_conversations_teach_the_tool_and_pass_their_checker(shared_data):
    tok = real_tokenizer(str(shared_data))
    convs = list(synthetic_conversations(n=40, split="val", seed=2))
    assert len(convs) == 40 * len(KINDS)
    for i, conv in enumerate(convs):
        kind = KINDS[i % len(KINDS)]
        assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
        assert conv[1]["tool_calls"][0]["name"] == "python"
        answer = make_problems(kind, 40, "val", 2)[i // len(KINDS)].answer
        assert check_answer(kind, conv[-1]["content"], answer)
        ids, mask = tok.render_conversation(conv)
        trained = tok.enc.decode([t for t, m in zip(ids, mask) if m])
        assert "<|python_start|>" in trained and conv[2]["content"] not in trained.split("<|python_end|>")[1]


def test_a_kind_listed_twice_gets_twice_the_distinct_problems():
    once = list(synthetic_conversations(("letter_count", "arithmetic"), n=30, split="train", seed=3))
    twice = list(synthetic_conversations(("letter_count", "arithmetic", "letter_count"), n=30, split="train", seed=3))
    prompts = [c[0]["content"] for c in twice]
    assert len(once) == 60 and len(twice) == 90
    letters = [p for p in prompts if "many" in p.lower() or "count" in p.lower()]
    assert len(letters) == 60 and len(set(letters)) == 60  # 60 distinct letter problems, not 30 repeated
    assert sorted(prompts).count(once[1][0]["content"]) == 1  # the arithmetic stays 30 problems
    # The first 30 of each kind are the single listing's problems: weighting adds, it does not reshuffle.
    assert [c[0]["content"] for c in once][0::2] == letters[:30]


def test_identity_conversations_follow_the_card(shared_data):
    card = IdentityCard(name="Quokka", maker="the Lakeside Lab", knowledge_cutoff="March 2025")
    convs = list(identity_conversations(card, n=300, split="train", seed=0, data_dir=str(shared_data)))
    assert len(convs) == 300 and convs == list(identity_conversations(card, 300, "train", 0, str(shared_data)))
    text = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert sum("Quokka" in t for t in text) > 150 and any("March 2025" in t for t in text)
    assert not any("{{" in t for t in text)
    overrides = [c for c in convs if c[0]["role"] == "system"]
    assert 40 < len(overrides) < 120 and sum(len(c) > 2 for c in convs if c[0]["role"] != "system") > 50
    for c in overrides:  # the system prompt's identity wins over the card
        other = re.search(r"(?:You are|Your name is) (\w+)", c[0]["content"]).group(1)
        assert "Quokka" not in c[-1]["content"]
        assert other in c[-1]["content"] or "built by" in c[-1]["content"] or "created me" in c[-1]["content"]
    # held-out phrasings: no user question of val appears in train
    q = lambda cs: {m["content"] for c in cs for m in c if m["role"] == "user"}  # noqa: E731
    val = list(identity_conversations(card, 200, "val", 0, str(shared_data)))
    assert q(val) and not q(val) & q(convs)
    pairs = llama_factory_pairs(card, str(shared_data))
    assert len(pairs) == 16 and all(q.isascii() for q, _ in pairs) and any("Quokka" in a for _, a in pairs)
    with pytest.raises(ChatforgeError, match="'name' is empty"):
        IdentityCard(name=" ")
