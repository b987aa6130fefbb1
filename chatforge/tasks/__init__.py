"""Tasks: datasets with their prompts and verifiers, and the conversation sources of post-training.

Each module reads one family of datasets through the data-directory setting (layout of shared/data).
Evaluation and RL share the answer checkers; SFT reads the conversation sources, which yield
conversations in the chat protocol of chatforge/tokenizer.py (lists of {role, content, ...} messages):

    mc.py             in-context multiple choice (ARC, HellaSwag, PIQA, WinoGrande, COPA, OpenBookQA,
                      BoolQ, LAMBADA; DCLM's CORE baselines) and chat-form multiple choice (ARC, MMLU)
                      with `extract_choice_letter`
    gsm8k.py          GSM8K and SVAMP word problems: `extract_gsm8k_answer`, `check_gsm8k`
    math.py           MATH-500: `last_boxed`, `normalize_math_answer`, `math_answers_equal`
    humaneval.py      HumanEval: `extract_code`, `build_program`, `check_program` (python sandbox)
    synthetic.py      weak spots made by code (letter counts, spelling, reversal, decimals, arithmetic):
                      `make_problems`, `check_answer`, tool-using conversations
    conversations.py  OpenAssistant, self-instruct, Glaive/BFCL function calls, GSM8K with python calls
    identity.py       identity conversations from an identity card
    search_qa.py      questions answered by a search call over the index
    probing.py        knowledge probing (known -> answer, unknown -> refusal); fictional entities
    teacher.py        an optional teacher model behind an OpenAI-compatible URL
    mixture.py        weighted mixture, rendering, padded/packed rows, replay

The modules import only the ground floor (chatforge.common, chatforge.tools, chatforge.tokenizer);
nothing here knows about engines or stages.
"""
