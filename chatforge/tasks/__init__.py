"""Tasks: datasets with their prompts and verifiers, shared by evaluation and training.

Each module reads one family of datasets from the data directory (layout of shared/data) and
offers the public answer checkers that both `chatforge eval` and the RL stage use as verifiers:

    mc.py         in-context multiple choice (ARC, HellaSwag, PIQA, WinoGrande, COPA, OpenBookQA,
                  BoolQ, LAMBADA; DCLM's CORE baselines) and chat-form multiple choice (ARC, MMLU)
                  with `extract_choice_letter`
    gsm8k.py      GSM8K and SVAMP word problems: `extract_gsm8k_answer`, `check_gsm8k`
    math.py       MATH-500: `last_boxed`, `normalize_math_answer`, `math_answers_equal`
    humaneval.py  HumanEval: `extract_code`, `build_program`, `check_program` (python sandbox)

The modules import only the ground floor (chatforge.common, chatforge.tools); nothing here knows
about models, engines or stages.
"""
