"""RL task registry (chatforge/tasks/rl.py): real data files, hand-written replies, held-out splits,
the format reward, and bad input (empty replies, no answer, a raising verifier, a task file with
missing fields) turning into counted zero rewards instead of a crash."""

from __future__ import annotations

import json
import logging

import pytest

from chatforge.common import ChatforgeError
from chatforge.losses import compute_group_normalized_rewards
from chatforge.tasks import synthetic
from chatforge.tasks.rl import RewardStats, arithmetic_problems, get_task, load_task_file


def test_gsm8k_real_items_and_replies(shared_data):
    task = get_task("gsm8k")
    train, val = task.items("train", str(shared_data)), task.items("val", str(shared_data))
    assert (len(train), len(val)) == (7473, 1319)
    item = train[0]  # Natalia sold clips ... #### 72
    assert item.answer == "72" and "Natalia" in item.messages[0]["content"]
    assert task.reward("In May she sold 24, so 48 + 24 = 72 clips.", item) == (1.0, "correct")
    assert task.reward("Work...\n#### 72", item) == (1.0, "correct")
    assert task.reward("It is 71.", item) == (0.0, "wrong")
    assert task.reward("I do not know.", item) == (0.0, "no_answer")
    assert task.reward("   \n", item) == (0.0, "empty")


def test_svamp_math500_arc_splits_are_disjoint_and_verified(shared_data):
    d = str(shared_data)
    for name, total in (("svamp", 1000), ("math500", 500)):
        task = get_task(name)
        tr, va = task.items("train", d), task.items("val", d)
        assert len(tr) + len(va) == total and 0.1 * total < len(va) < 0.3 * total
        assert not {i.id for i in tr} & {i.id for i in va}
    math = get_task("math500")
    item = next(i for i in math.items("train", d) + math.items("val", d) if i.answer == "\\frac{14}{3}")
    assert math.reward("so $x = \\boxed{\\dfrac{14}{3}}$.", item)[1] == "correct"
    assert math.reward("x = \\boxed{14/3}", item)[1] == "correct"
    assert math.reward("x = \\boxed{4.67}", item)[1] == "wrong"
    assert math.reward("I think it is 14/3", item)[1] == "no_answer"  # no box, no "answer is"
    arc = get_task("arc_easy")
    item = arc.items("val", d)[0]
    assert arc.reward(f"The answer is ({item.answer}).", item) == (1.0, "correct")
    other = next(x for x in "ABCD" if x != item.answer)
    assert arc.reward(f"{other}.", item) == (0.0, "wrong")


def test_graded_arithmetic_and_word_tasks():
    for d in (1, 3, 6):
        probs = arithmetic_problems(d, 50, "train")
        for p in probs:
            a, op, b = p.code.split()
            assert len(a) == d and len(b) == d and int(p.answer) == eval(p.code)  # noqa: S307 (our own a op b)
        val = {p.prompt for p in arithmetic_problems(d, 50, "val")}
        if d > 1:
            assert not val & {p.prompt for p in probs}
    task = get_task("arithmetic3")
    item = task.items("val", n=5)[0]
    assert task.reward(f"The answer is {item.answer}.", item) == (1.0, "correct")
    assert task.reward(f"so {item.answer}", item) == (1.0, "correct")  # last number fallback
    assert task.reward("The answer is 0.5.", item)[1] == "wrong"
    spell = get_task("spelling")
    item = spell.items("train", n=3)[0]
    word = item.answer.replace("-", "")
    assert spell.reward(f"The answer is {'-'.join(word.upper())}.", item) == (1.0, "correct")
    assert spell.reward(f"The answer is {word}.", item) == (0.0, "wrong")
    assert spell.reward(f"It is spelt {word}", item) == (0.0, "no_answer")
    lc = get_task("letter_count")
    item = lc.items("train", n=1)[0]
    assert lc.reward(f"The answer is {item.answer}.", item)[0] == 1.0
    assert synthetic.check_answer("letter_count", f"The answer is {item.answer}.", item.answer)
    with pytest.raises(ChatforgeError, match="unknown RL task 'chess'"):
        get_task("chess")


def test_format_reward_is_added():
    task = get_task("arithmetic2", format_weight=0.1)
    item = task.items("train", n=1)[0]
    assert task.reward(f"The answer is {item.answer}.", item) == (1.1, "correct")
    assert task.reward(f"{item.answer}", item) == (1.0, "correct")
    assert task.reward("The answer is nothing.", item) == (0.1, "no_answer")
    assert task.reward("The answer is 1000000.", item) == (0.1, "wrong")


def test_bad_replies_and_a_raising_verifier_are_counted_not_fatal(caplog):
    task = get_task("gsm8k")
    item = type("I", (), {"id": "x", "answer": "5"})()

    def boom(reply, answer):
        raise ZeroDivisionError("bug in verifier")

    task.check = boom
    stats = RewardStats(task)
    replies = ["5", "", "no number", "The answer is 5.", None]
    with caplog.at_level(logging.WARNING):
        adv, raw, meta = compute_group_normalized_rewards(stats, replies + ["5"], [item] * 6, 3)
    assert raw.tolist() == [0.0] * 6
    assert stats.counts == {"verifier_error: ZeroDivisionError": 3, "empty": 2, "no_answer": 1}
    assert meta["reasons"] == stats.counts and meta["groups_dropped"] == 2
    assert "verifier_error" in caplog.text and "empty" in caplog.text


def test_task_file_with_missing_fields_is_skipped_and_counted(tmp_path, caplog):
    p = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"question": "1+1?", "answer": "2"}), json.dumps({"question": "no answer"}),
             "{not json", json.dumps(["a list"]), json.dumps({"answer": "3"}), "",
             json.dumps({"question": "2+2?", "answer": 4})]
    p.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        items, skipped = load_task_file(p)
    assert [(i.messages[0]["content"], i.answer) for i in items] == [("1+1?", "2"), ("2+2?", "4")]
    assert skipped == {"missing 'answer'": 1, "not JSON": 1, "not an object": 1, "missing 'question'": 1}
    assert "skipped 4 of 6 records" in caplog.text
    assert get_task("gsm8k").reward("That makes 4.", items[1]) == (1.0, "correct")
    with pytest.raises(ChatforgeError, match="not found"):
        load_task_file(tmp_path / "nope.jsonl")
