"""Checks of a chat model after SFT, each a rate over held-out prompts, all through the engine
(chatforge.engine.Engine: one generation path, tools included):

    well_formed_rate(engine, prompts)          replies that end with <|assistant_end|>, say something,
                                               and whose tool calls (if any) ran
    identity_rates(engine, card, n)            held-out identity phrasings: the reply names the model,
                                               the maker, both
    tool_task_rates(engine, kind, n)           held-out synthetic problems (letter counting, arithmetic):
                                               a python call that ran, and the right final answer

Held-out means the 'val' split of each generator (chatforge.tasks.synthetic / identity hash words,
operands and phrasings into splits), so no prompt here was trained on.
"""

from __future__ import annotations

import re
from typing import Sequence

from chatforge.tasks.identity import QUESTIONS, IdentityCard, llama_factory_pairs
from chatforge.tasks.conversations import split_of
from chatforge.tasks.synthetic import check_answer, make_problems


def well_formed(completion) -> str | None:
    """Why a reply is not well formed, or None: it must end with the assistant's end token (not the
    length limit), hold visible text, and every tool call in it must have run without error.

    >>> from chatforge.engine import Completion
    >>> well_formed(Completion(0, 0, 3, text="Hi!", finish_reason="stop"))
    >>> well_formed(Completion(0, 0, 3, text="Hi", finish_reason="length"))
    'no_end'
    """
    if completion.finish_reason != "stop":
        return "no_end"
    if not completion.text.strip():
        return "empty"
    if any(c.error for c in completion.tool_calls):
        return "tool_error"
    return None


def _generate(engine, conversations: Sequence[list[dict]], max_tokens: int, use_tools: bool, batch_size: int,
              **sampling):
    """Replies to the conversations, greedy unless `sampling` (temperature, top_k, top_p) says otherwise;
    seeded."""
    tok, ctx = engine.tok, engine.config.max_seq_len
    sampling = {"temperature": 0.0, **sampling}
    out = []
    for i in range(0, len(conversations), batch_size):
        chunk = [tok.render_prompt(m) for m in conversations[i:i + batch_size]]
        chunk = [p[-(ctx - max_tokens):] if len(p) > ctx - max_tokens else p for p in chunk]
        out += engine.generate(chunk, max_tokens=max_tokens, seed=0, use_tools=use_tools, **sampling)
    return out


def well_formed_rate(engine, prompts: Sequence[list[dict]], max_tokens: int = 128, use_tools: bool = True,
                     batch_size: int = 16, examples: int = 3, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None) -> dict:
    """Share of well-formed replies to the prompts (conversations ending with a user turn): greedy by
    default, or sampled (seeded) at the given temperature, top-k and top-p."""
    comps = _generate(engine, prompts, max_tokens, use_tools, batch_size, temperature=temperature, top_k=top_k,
                      top_p=top_p)
    reasons = [well_formed(c) for c in comps]
    bad: dict[str, int] = {}
    for r in reasons:
        if r:
            bad[r] = bad.get(r, 0) + 1
    n = max(1, len(comps))
    return {"n": len(comps), "well_formed_rate": sum(r is None for r in reasons) / n, "failures": bad,
            "decoding": "greedy" if temperature == 0 else
                        f"temperature {temperature:g}, top-k {top_k or 'all'}, top-p {top_p or 1:g}, seeded",
            "examples": [{"prompt": p[-1]["content"][:200], "reply": c.text[:300]}
                         for p, c in list(zip(prompts, comps))[:examples]]}


def identity_prompts(card: IdentityCard, split: str = "val", data_dir: str = "") -> list[tuple[str, str]]:
    """(topic, question) of the held-out split asking who the model is or who made it: the identity
    module's phrasings and LLaMA-Factory's English questions whose answer names the model."""
    out = [(t, q) for t, qs in QUESTIONS.items() if t in ("name", "maker") for q in qs
           if split_of("identity:" + q, 0.2) == split]
    try:
        pairs = llama_factory_pairs(card, data_dir)
    except Exception:  # the dataset is optional here: the module's own phrasings still measure it
        pairs = []
    out += [("dataset", q) for q, a in pairs if split_of("identity:" + q, 0.2) == split and card.name in a]
    return out


def identity_rates(engine, card: IdentityCard, split: str = "val", data_dir: str = "", max_tokens: int = 48,
                   examples: int = 3) -> dict:
    """Held-out identity questions: shares of greedy replies that name the model (card.name), the maker
    (card.maker), and both."""
    asks = identity_prompts(card, split, data_dir)
    comps = _generate(engine, [[{"role": "user", "content": q}] for _, q in asks], max_tokens, False, 16)
    name = re.compile(re.escape(card.name), re.IGNORECASE)
    maker = re.compile(re.escape(card.maker.removeprefix("the ")), re.IGNORECASE)
    has_name = [bool(name.search(c.text)) for c in comps]
    has_maker = [bool(maker.search(c.text)) for c in comps]
    n = max(1, len(comps))
    return {"n": len(comps), "name_rate": sum(has_name) / n, "maker_rate": sum(has_maker) / n,
            "name_and_maker_rate": sum(a and b for a, b in zip(has_name, has_maker)) / n,
            "name_or_maker_rate": sum(a or b for a, b in zip(has_name, has_maker)) / n,
            "examples": [{"question": q, "reply": c.text[:200]} for (_, q), c in list(zip(asks, comps))[:examples]]}


def tool_task_rates(engine, kind: str, n: int = 50, split: str = "val", seed: int = 0, max_tokens: int = 96,
                    batch_size: int = 16, examples: int = 3) -> dict:
    """Held-out synthetic problems of one kind, answered greedily with the python tool on: the share
    with a python call that ran without error, and the share whose final answer is right."""
    problems = make_problems(kind, n, split, seed)
    comps = _generate(engine, [[{"role": "user", "content": p.prompt}] for p in problems], max_tokens, True, batch_size)
    called = [any(c.name == "python" and not c.error for c in comp.tool_calls) for comp in comps]
    correct = [check_answer(kind, comp.text, p.answer) for p, comp in zip(problems, comps)]
    m = max(1, len(comps))
    return {"n": len(comps), "python_call_rate": sum(called) / m, "correct_rate": sum(correct) / m,
            "examples": [{"prompt": p.prompt, "reply": c.text[:200], "answer": p.answer,
                          "calls": [(t.arguments, t.output[:40]) for t in c.tool_calls]}
                         for p, c in list(zip(problems, comps))[:examples]]}
