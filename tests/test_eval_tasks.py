"""The task modules (chatforge/tasks): answer parsers on hand-written replies, the loaders on the real
data files (record counts from shared/data's MANIFEST), the prompt rendering of the in-context suite,
and HumanEval programs run in the python sandbox. The RL stage reuses these parsers as verifiers."""

from __future__ import annotations

import pytest

from chatforge.common import ChatforgeError
from chatforge.tasks import gsm8k as G
from chatforge.tasks import humaneval as H
from chatforge.tasks import math as M
from chatforge.tasks import mc

# ----------------------------------------------------------------------------------------------
# GSM8K / SVAMP


@pytest.mark.parametrize("reply, expected", [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is 72.", "72"),
    ("So it costs $1,000.50 in total.", "1000.50"),
    ("First 3-5 = -2, so the answer is -2", "-2"),  # "3-5" is not "-5"
    ("It is 0.5 of the cake, i.e. .5", ".5"),
    ("Items 1,2,3 sum to 6", "6"),  # a list, not the number 123
    ("#### 18\nActually the answer is 20", "18"),  # the #### line wins over later numbers
    ("I am not sure.", None),
    ("", None),
])
def test_extract_gsm8k_answer(reply, expected):
    assert G.extract_gsm8k_answer(reply) == expected


def test_check_gsm8k_and_numbers_equal():
    assert G.check_gsm8k("She has 18.00 dollars", "18")
    assert G.check_gsm8k("#### 1,000", 1000.0)
    assert not G.check_gsm8k("She has 17 dollars", "18")
    assert not G.check_gsm8k("no number", "18")
    assert G.numbers_equal("3", 3.0) and not G.numbers_equal(None, "3") and not G.numbers_equal("x", "3")
    assert G.parse_number("costs $2,500 per month") == 2500.0


def test_gsm8k_and_svamp_files(shared_data):
    """Every GSM8K test reference solution, read as a model reply, checks as correct against its own
    `#### N` (1,319 records per the MANIFEST); SVAMP has 1,000 problems with numeric answers."""
    gsm = G.load_gsm8k("test", str(shared_data))
    assert len(gsm) == 1319
    assert all(G.check_gsm8k(p["solution"], p["answer"]) for p in gsm)
    assert gsm[0]["answer"] == "18"
    svamp = G.load_svamp(str(shared_data))
    assert len(svamp) == 1000 and svamp[0]["answer"] == "51"
    assert svamp[0]["question"].startswith("Each pack of dvds costs 76 dollars.")


# ----------------------------------------------------------------------------------------------
# MATH


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{3}{4}}$.", r"\frac{3}{4}"),
    (r"\boxed{1} then \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"the answer is \boxed 5.", "5"),
    (r"\fbox{x^2}", "x^2"),
    (r"\boxed{unclosed", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert M.last_boxed(text) == expected


@pytest.mark.parametrize("pred, ref", [
    ("0.75", r"\frac34"), (r"\dfrac{3}{4}", "3/4"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt2}"),
    ("x = 5", "5"), (r"5\text{ cm}", "5"), (r"90^\circ", "90"), (r"\$1,000", "1000"), ("50\\%", "50"),
    ("(1, 2)", "(1,2)"), (r"\left[ 0, \frac{1}{2} \right)", "[0,0.5)"), (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\text{(C)}", "(C)"), (r"\pi", "3.14159265359"), ("10.0", "10"), (".5", "1/2"),
])
def test_math_answers_equal(pred, ref):
    assert M.math_answers_equal(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("4", "5"), ("(1,2)", "[1,2]"), ("(1,2)", "(2,1)"), (r"\frac{1}{3}", "0.33"), ("x+1", "x+2"), (None, "1"),
])
def test_math_answers_differ(pred, ref):
    assert not M.math_answers_equal(pred, ref)


def test_math_checker_is_bounded():
    """A reply cannot make the verifier hang or blow up: huge exponents and long expressions are
    compared as strings, never evaluated."""
    assert M.math_value("9^{9^{9}}") is None
    assert M.math_value("2^{100}") is None
    assert M.math_value("+".join(["1"] * 300)) is None
    assert M.math_value("__import__('os')") is None
    assert not M.math_answers_equal("9^{9^{9}}", "1")


def test_extract_math_answer():
    assert M.extract_math_answer(r"We get $\boxed{7}$. Done") == "7"
    assert M.extract_math_answer("So the final answer is $12$.") == "12"
    assert M.check_math(r"thus \boxed{\dfrac{1}{2}}", "0.5")
    assert M.extract_math_answer("I give up") is None


def test_math500_file_and_normalizer_on_real_answers(shared_data):
    """Each MATH-500 reference solution boxes its answer; reading the solution as a reply must give
    that answer back for (nearly) all 500 problems: a check of the normaliser on real LaTeX."""
    probs = M.load_math500(str(shared_data))
    assert len(probs) == 500
    import json

    sols = [json.loads(line)["solution"] for line in open(shared_data / "math/math500/test.jsonl", encoding="utf-8")]
    agree = sum(M.check_math(s, p["answer"]) for s, p in zip(sols, probs))
    assert agree == 500, agree
    assert all(M.math_answers_equal(p["answer"], p["answer"]) for p in probs)


# ----------------------------------------------------------------------------------------------
# Multiple choice


@pytest.mark.parametrize("reply, n, expected", [
    ("B", 4, "B"), ("B. Paris", 4, "B"), ("(C) because", 4, "C"), ("**D**", 4, "D"),
    ("The answer is (C).", 4, "C"), ("Answer: A", 4, "A"), ("answer is b", 4, None),
    ("I think it is A. No wait, the answer is D", 4, "D"), ("A cat is not a dog", 4, None),
    ("Choice E", 4, None), ("E", 5, "E"), ("I pick C", 4, "C"), ("Either A. or B.", 4, None), ("", 4, None),
])
def test_extract_choice_letter(reply, n, expected):
    assert mc.extract_choice_letter(reply, n) == expected


CORE_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "copa": 100, "hellaswag": 10042,
               "lambada_openai": 5153, "openbook_qa": 500, "piqa": 1838, "winogrande": 1267}


@pytest.mark.parametrize("name", list(mc.CORE_TASKS))
def test_core_files_load_completely(shared_data, name):
    """Every record of every suite file reads (counts from the MANIFEST), gold indices in range."""
    items, bad = mc.load_core_items(mc.CORE_TASKS[name], str(shared_data))
    assert (len(items), bad) == (CORE_COUNTS[name], 0)
    if mc.CORE_TASKS[name].kind != "language_modeling":
        assert all(0 <= it.gold < len(it.choices) for it in items)


def test_hellaswag_text_layout(shared_data):
    items, _ = mc.load_core_items(mc.CORE_TASKS["hellaswag"], str(shared_data))
    assert items[0].query == "Roof shingle removal: A man is sitting on a roof. he"
    assert items[0].gold == 3 and items[0].choices[3] == "starts pulling up roofing on a roof."


def test_core_meta_gives_dclm_shots_and_baselines(shared_data):
    meta = mc.read_core_meta(str(shared_data))
    assert set(mc.CORE_TASKS) <= set(meta)
    assert meta["arc_easy"] == {"shots": 10, "random_baseline": 0.25, "category": "world knowledge"}
    assert (meta["boolq"]["shots"], meta["boolq"]["random_baseline"]) == (10, 0.62)
    assert (meta["copa"]["shots"], meta["lambada_openai"]["random_baseline"]) == (0, 0.0)
    assert mc.centered_accuracy(0.62, 0.62) == 0.0


def test_missing_file_and_missing_meta(tmp_path):
    with pytest.raises(ChatforgeError, match="arc_easy.jsonl not found"):
        mc.load_core_items(mc.CORE_TASKS["arc_easy"], str(tmp_path))
    assert mc.read_core_meta(str(tmp_path)) == {}


def test_bad_records_are_skipped_and_counted(tmp_path):
    d = tmp_path / "eval" / "copa"
    d.mkdir(parents=True)
    (d / "copa.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\nnot json\n'
                                  '{"query": "q", "choices": ["a"], "gold": 3}\n{"query": "q"}\n\n')
    items, bad = mc.load_core_items(mc.CORE_TASKS["copa"], str(tmp_path))
    assert len(items) == 1 and bad == 3


def test_render_moves_space_and_formats_fewshot():
    arc = mc.CORE_TASKS["arc_easy"]
    shot = mc.MCItem(query="Question: 1+1?", choices=["3", "2"], gold=1)
    item = mc.MCItem(query="Question: Sky?", choices=["blue", "green"], gold=0)
    pairs = mc.render_item(arc, item, [shot])
    assert pairs == [("Question: 1+1?\nAnswer: 2\n\nQuestion: Sky?\nAnswer:", " blue"),
                     ("Question: 1+1?\nAnswer: 2\n\nQuestion: Sky?\nAnswer:", " green")]
    wino = mc.CORE_TASKS["winogrande"]
    item = mc.MCItem(choices=["Sarah was better so Sarah", "Sarah was better so Maria"], continuation="won.", gold=0)
    assert mc.render_item(wino, item, []) == [("Sarah was better so Sarah", " won."), ("Sarah was better so Maria", " won.")]
    lam = mc.CORE_TASKS["lambada_openai"]
    assert mc.render_item(lam, mc.MCItem(query="He said hi to  ", continuation="her"), []) == [("He said hi to", " her")]


def test_fewshot_sampling_is_fixed_and_excludes_the_item():
    a = mc.sample_fewshot(100, 7, 10, seed=1)
    assert a == mc.sample_fewshot(100, 7, 10, seed=1) and 7 not in a and len(set(a)) == 10
    assert a != mc.sample_fewshot(100, 7, 10, seed=2)
    assert mc.sample_fewshot(3, 0, 10, seed=1) in ([1, 2], [2, 1]) and mc.sample_fewshot(100, 0, 0, 1) == []


def test_chat_mc_files(shared_data):
    arc = mc.load_arc_chat("challenge", str(shared_data))
    assert len(arc) == 1172 and not arc[0]["question"].startswith("Question:")
    mmlu = mc.load_mmlu("test", str(shared_data))
    assert len(mmlu) == 14042  # MMLU's test split (Hendrycks et al.)
    assert {m["answer"] for m in mmlu} == set("ABCD") and len({m["subject"] for m in mmlu}) == 57
    prompt = mc.mc_chat_prompt(mmlu[0]["question"], mmlu[0]["choices"], mmlu[0]["subject"])[0]["content"]
    assert "about abstract algebra" in prompt and "\nD. " in prompt and prompt.endswith("(A, B, C, D).")


# ----------------------------------------------------------------------------------------------
# HumanEval


def test_extract_code_and_build_program():
    p = {"prompt": "from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    \"\"\"sum\"\"\"\n",
         "entry_point": "f", "test": "def check(c):\n    assert c([1, 2]) == 3\n"}
    assert H.extract_code("```python\ndef f(x):\n    return 1\n```") == "def f(x):\n    return 1\n"
    assert H.extract_code("```\nprint(1)\n") == "print(1)\n"  # unclosed fence runs to the end
    assert H.extract_code("    return 1\n") == "    return 1\n"
    whole = H.build_program(p, "Sure:\n```python\ndef f(xs):\n    return sum(xs)\n```")
    assert whole.startswith("from typing import List\n") and "def f(xs):" in whole and whole.endswith("check(f)\n")
    body = H.build_program(p, "    return sum(xs)\n")
    assert body.startswith(p["prompt"] + "    return sum(xs)")


def test_humaneval_in_the_sandbox(shared_data):
    """Canonical solutions pass, a wrong one fails on its assert, an endless loop fails on the timeout."""
    probs = H.load_humaneval(str(shared_data))
    assert len(probs) == 164
    for p in probs[:3]:
        ok, why = H.check_program(H.build_program(p, p["canonical_solution"]), timeout_s=10)
        assert ok, (p["task_id"], why)
    p = probs[0]
    ok, why = H.check_program(H.build_program(p, "    return False\n"), timeout_s=10)
    assert not ok and "AssertionError" in why
    ok, why = H.check_program(H.build_program(p, "    while True:\n        pass\n"), timeout_s=1.5)
    assert not ok and ("timed out" in why or "CPU" in why)
