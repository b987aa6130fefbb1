"""Conversation sources (chatforge/tasks/conversations.py) on the real files of the data directory:
what each record becomes, held-out splits, counted skips for bad records, GSM8K calls that the real
python sandbox answers exactly as written, and HF chat-template parity on every rendered source."""

from __future__ import annotations

import json
import re

import pytest

from chatforge.tasks.conversations import (SourceStats, bfcl_conversations, check_conversation, eval_arithmetic,
                                           glaive_conversations, gsm8k_tool_conversations, gsm8k_tool_messages,
                                           oasst_conversations, self_instruct_conversations, split_of)
from sft_helpers import hf_tokenizer, real_tokenizer


def both_splits(fn, **kw):
    out = {}
    for split in ("train", "val"):
        st = SourceStats()
        out[split] = (list(fn(split=split, stats=st, **kw)), st)
    return out


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("messages, reason", [
    ([U, A], None),
    ([], "empty_conversation"),
    ([{"role": "wizard", "content": "x"}, A], "unknown_role"),
    ([{"role": "user", "content": "  "}, A], "empty_turn"),
    ([U, {"role": "assistant", "content": ""}], "empty_turn"),
    ([U, A, A], "consecutive_assistant"),
    ([U, U, A], "consecutive_user"),
    ([U, {"role": "tool", "content": "42"}, A], "tool_without_call"),
    ([U, {"role": "assistant", "content": "", "tool_calls": [{"name": "python", "arguments": "1+1"}]}, A],
     "unanswered_tool_call"),
    ([{"role": "system", "content": "", "tools": [{"name": "f"}]}, U,
      {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{oops"}]}], "invalid_tool_call_json"),
    ([U, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]}], "undeclared_function"),
    ([A], "no_user_first"),
    ([U, A, U], "ends_without_reply"),
    ([U, A, {"role": "system", "content": "late"}, A], "misplaced_system"),
    ("not a list", "empty_conversation"),
])
def test_check_conversation_reasons(messages, reason):
    assert check_conversation(messages) == reason


def test_split_is_deterministic_and_near_the_fraction():
    keys = [f"k{i}" for i in range(4000)]
    val = [k for k in keys if split_of(k, 0.1) == "val"]
    assert 0.08 < len(val) / len(keys) < 0.12
    assert val == [k for k in keys if split_of(k, 0.1) == "val"]
    # a larger share only moves records from train to val, never back
    assert set(val) < {k for k in keys if split_of(k, 0.2) == "val"}


def test_oasst_follows_the_best_ranked_reply(shared_data):
    trees = {json.loads(l)["message_tree_id"]: json.loads(l)["prompt"]
             for l in (shared_data / "chat/oasst/en_100_tree.jsonl").read_text().splitlines()}
    splits = both_splits(oasst_conversations)
    train, st = splits["train"]
    val, st_val = splits["val"]
    assert st.records == 100 and st.conversations + st.other_split + sum(st.skipped.values()) == 100
    assert len(train) + len(val) == 100 - sum(st.skipped.values())
    assert sum(len(c) > 2 for c in train) > 30  # multi-turn threads are kept
    by_prompt = {t["text"].strip(): t for t in trees.values()}
    for conv in train + val:
        node = by_prompt[conv[0]["content"]]
        for msg in conv[1:]:
            live = [r for r in node["replies"] if not r.get("deleted")]
            ranks = [r["rank"] for r in live if r.get("rank") is not None]
            chosen = next(r for r in live if r["text"].strip() == msg["content"])
            if ranks:  # the chosen reply is the best ranked of its siblings (rank 0 is best)
                assert chosen.get("rank") == min(ranks)
            node = chosen
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in val}


def test_oasst_bad_records_are_counted(shared_data, tmp_path):
    lines = (shared_data / "chat/oasst/en_100_tree.jsonl").read_text().splitlines()[:6]
    recs = [json.loads(l) for l in lines]
    recs[0]["prompt"]["role"] = "moderator"
    recs[1]["prompt"]["text"] = "   "
    recs[2]["prompt"]["replies"] = []  # a question nobody answered
    f = tmp_path / "trees.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    st = SourceStats()
    out = list(oasst_conversations(str(f), split="train", val_fraction=0.0, stats=st))
    assert len(out) == 3 and st.records == 7
    assert dict(st.skipped) == {"unknown_role": 1, "empty_turn": 1, "no_assistant_turn": 1, "not_json": 1}


def test_self_instruct_instances(shared_data):
    splits = both_splits(self_instruct_conversations)
    train, st = splits["train"]
    assert st.records == 175 + 252 and len(train) + len(splits["val"][0]) == 427
    seed0 = json.loads((shared_data / "chat/self_instruct/seed_tasks.jsonl").read_text().splitlines()[1])
    inst = seed0["instances"][0]
    conv = next(c for c in train + splits["val"][0] if c[0]["content"].startswith(seed0["instruction"]))
    assert conv == [{"role": "user", "content": seed0["instruction"] + "\n\n" + inst["input"]},
                    {"role": "assistant", "content": inst["output"]}]


def test_glaive_function_calls_and_bad_records(shared_data, tmp_path):
    splits = both_splits(glaive_conversations)
    train, st = splits["train"]
    assert st.records == 300 and len(train) + len(splits["val"][0]) == 300
    with_calls = [c for c in train if any(m.get("tool_calls") for m in c)]
    assert len(with_calls) > 100
    conv = with_calls[0]
    assert conv[0]["role"] == "system" and conv[0]["tools"]
    call = next(m for m in conv if m.get("tool_calls"))["tool_calls"][0]
    assert isinstance(call["arguments"], dict) and call["name"] in {t["name"] for t in conv[0]["tools"]}
    # bad records: invalid JSON call, a call to an undeclared function, an observation with no call,
    # an unknown turn kind
    recs = json.loads((shared_data / "chat/toolcall/glaive_toolcall_en_demo.json").read_text())
    fc = [r for r in recs if any(t["from"] == "function_call" for t in r["conversations"])][:5]
    bad = json.loads(json.dumps(fc))
    next(t for t in bad[0]["conversations"] if t["from"] == "function_call")["value"] = '{"name": "x", "arguments": {'
    next(t for t in bad[1]["conversations"] if t["from"] == "function_call")["value"] = '{"name": "not_declared", "arguments": {}}'
    bad[2]["conversations"] = [t for t in bad[2]["conversations"] if t["from"] != "function_call"]
    bad[3]["conversations"][0]["from"] = "narrator"
    f = tmp_path / "glaive.json"
    f.write_text(json.dumps(bad))
    st = SourceStats()
    out = list(glaive_conversations(str(f), val_fraction=0.0, stats=st))
    assert len(out) == 1
    assert dict(st.skipped) == {"invalid_tool_call_json": 1, "undeclared_function": 1, "tool_without_call": 1,
                                "unknown_role": 1}


def test_bfcl_ground_truth_calls(shared_data):
    splits = both_splits(bfcl_conversations)
    convs = splits["train"][0] + splits["val"][0]
    assert len(convs) == 400 and splits["val"][1].conversations == len(splits["val"][0]) > 40
    calls = {c[1]["content"]: c[2]["tool_calls"][0] for c in convs}
    assert calls["Find the area of a triangle with a base of 10 units and height of 5 units."] == {
        "name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5, "unit": "units"}}
    hyp = next(v for k, v in calls.items() if k.startswith("Calculate the hypotenuse of a right triangle given"))
    assert hyp == {"name": "math.hypot", "arguments": {"x": 4, "y": 5}}  # optional z ("" first) left out
    # compact schemas keep what a call needs (names, types, required) and drop parameter descriptions
    full = next(bfcl_conversations(split="train"))[0]["tools"][0]
    small = next(bfcl_conversations(split="train", compact_tools=True))[0]["tools"][0]
    assert small["name"] == full["name"] and small["parameters"]["required"] == full["parameters"]["required"]
    assert {k: v["type"] for k, v in small["parameters"]["properties"].items()} == {
        k: v["type"] for k, v in full["parameters"]["properties"].items()}
    assert "description" not in json.dumps(small["parameters"]) and "description" in json.dumps(full["parameters"])


def test_gsm8k_annotations_become_python_calls(shared_data):
    rec = json.loads((shared_data / "math/gsm8k/train.jsonl").read_text().splitlines()[0])
    msgs = gsm8k_tool_messages(rec["question"], rec["answer"])
    assert msgs[1] == {"role": "assistant", "content": "Natalia sold 48/2 = ",
                       "tool_calls": [{"name": "python", "arguments": "48/2"}]}
    assert msgs[2] == {"role": "tool", "name": "python", "content": "24.0\n"}
    assert msgs[-1]["content"].endswith("#### 72")
    splits = both_splits(gsm8k_tool_conversations)
    train, st = splits["train"]
    assert st.records == 7473 and not st.skipped
    # the assistant text is the original solution with the annotations taken out, for every record
    originals = {}
    for line in (shared_data / "math/gsm8k/train.jsonl").read_text().splitlines():
        r = json.loads(line)
        originals[r["question"].strip()] = re.sub(r"<<[^<>]*>>", "", r["answer"]).strip()
    for conv in train + splits["val"][0]:
        text = "".join(m["content"] for m in conv if m["role"] == "assistant")
        assert text == originals[conv[0]["content"]]


def test_gsm8k_tool_outputs_are_what_the_sandbox_prints():
    from chatforge.tools.python_sandbox import run_python

    exprs = ["48/2", "48+24", "12*50", "1/3*90", "2**10", "(5-2)*4", "100-38", "7.5*4", "10%3", "7//2"]
    for e in exprs:
        msgs = gsm8k_tool_messages("Q?", f"x <<{e}=0>> y\n#### 0")
        assert msgs[2]["content"] == run_python(e).text(), e


def test_gsm8k_never_evaluates_code(tmp_path):
    f = tmp_path / "gsm.jsonl"
    evil = ["__import__('os').system('touch pwned')", "open('x').read()", "9**9**9", "1/0", "[1]*10"]
    f.write_text("".join(json.dumps({"question": "q", "answer": f"a <<{e}=1>>1\n#### 1"}) + "\n" for e in evil))
    st = SourceStats()
    assert list(gsm8k_tool_conversations(str(f), val_fraction=0.0, stats=st)) == []
    assert dict(st.skipped) == {"bad_calc_annotation": 5}
    with pytest.raises(ValueError):
        eval_arithmetic("(lambda: 1)()")


def test_every_source_renders_like_the_hf_chat_template(shared_data, tmp_path):
    """The exported tokenizer's chat template gives the ids render_conversation gives, on real
    conversations of every source: system tools, function calls, built-in calls, multi-turn."""
    tok = real_tokenizer(str(shared_data))
    hf = hf_tokenizer(str(shared_data), str(tmp_path / "hf"))
    sources = [oasst_conversations(split="val"), self_instruct_conversations(split="val"),
               glaive_conversations(split="val"), bfcl_conversations(split="val"), gsm8k_tool_conversations(split="val")]
    n = 0
    for convs in sources:
        for conv in list(convs)[:25]:
            ids, mask = tok.render_conversation(conv)
            assert hf.apply_chat_template(conv, tokenize=True, return_dict=False) == ids
            assert any(mask)
            assert tok.parse_conversation(ids)[1:] == conv[1:]
            n += 1
    assert n > 100  # OASST holds out 9 trees, the others 25 each
