"""Evaluation of a checkpoint: the base-model suite and the chat-model tasks, into one eval.json.

    result = evaluate_checkpoint("runs/tiny/pretrain/checkpoint", ["base"], "runs/tiny/eval/base/eval.json")
    result["core"]["score"], result["tasks"]["arc_easy"]["accuracy"]

Tasks (`list_tasks()`; groups: base, core, chat, probes, all):

    bpb                 validation bits per byte on the run's held-out text (the pretrain stage's
                        validation split, or --bpb_text files) and the unigram baseline on it
    hellaswag ... boolq the in-context multiple-choice suite (chatforge.tasks.mc): per-choice
                        log-likelihood, few-shot, centred against DCLM's random baselines; CORE = mean
    gsm8k svamp math500 math500_tools humaneval
                        generation with answer extraction (chatforge.tasks.gsm8k / math / humaneval);
                        `_tools` lets the model call the python sandbox while it answers
    chat_arc_easy chat_arc_challenge mmlu
                        multiple choice in chat form, answered with a letter
    probe_* [_tools]    weak-spot probes from chatforge.tasks.synthetic (letter counting, spelling,
                        reverse, decimal comparison, multi-digit arithmetic) on its held-out 'val'
                        split, with and without tools
    probe_identity      held-out identity questions (chatforge.tasks.identity): the reply names the
                        assistant (and its maker when asked who made it), the SFT card's or a
                        system prompt's identity
    probe_fictional probe_fictional_known
                        questions about fictional people (chatforge.tasks.probing): withheld ones
                        should be refused, those in the pretraining text (the run's facts file)
                        answered; accuracy, refusal rate, and the same on people SFT never saw
    probe_known_facts   well-known facts (chatforge.tasks.world_facts): should be answered, not refused

**Scoring the multiple-choice suite, batched.** nanochat and lm-evaluation-harness run every
choice as its own full sequence. Here the choices of a question share their context: the context
is run once (a prefill into the KV cache), the cache rows are repeated once per choice, and only the
continuations run after it, all choices of several questions in one forward (contexts left-padded,
continuations right-padded; the model gives every row its own positions and masks its padding, see
chatforge/model.py). With 10 shots the context is most of the tokens, so most of the work is done once
per question instead of once per choice. `score_continuations` is that scorer; a test checks it
against `transformers` on the exported model to 1e-4, and bench/bench_eval.py measures it against
one-choice-at-a-time `transformers` scoring.

**Generation** goes through chatforge.engine.Engine (batched, greedy, seeded), prompts rendered with
the chat protocol. A chat task on a checkpoint that has not learned the protocol (a base model, or a
tokenizer without the chat tokens) is refused with the list of tasks it can run.

**eval.json** is rewritten (atomically) after every task, so an interrupted evaluation keeps what it
finished; a rerun reuses results whose checkpoint and settings are unchanged and does the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from chatforge.bpb import evaluate_bpb, unigram_bpb
from chatforge.common import ChatforgeError, amp_dtype, write_json
from chatforge.common import data_dir as data_root_of
from chatforge.model import KVCache
from chatforge.tasks import identity, mc, probing, synthetic, world_facts
from chatforge.tasks.conversations import split_of

EVAL_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# The task registry


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # for tables
    kind: str  # bpb | core | generate | chat_mc | probe | identity | entity | facts
    group: str  # base | chat | probes
    tools: bool = False  # the model may call the python sandbox while it answers
    source: str = ""  # dataset (generate/chat_mc), synthetic kind (probe), CORE task (core), known|unknown (entity)


def _registry() -> dict[str, Task]:
    tasks = [Task("bpb", "val bits/byte", "bpb", "base")]
    tasks += [Task(t.name, t.title, "core", "base", source=t.name) for t in mc.CORE_TASKS.values()]
    tasks += [
        Task("gsm8k", "GSM8K", "generate", "chat", source="gsm8k"),
        Task("svamp", "SVAMP", "generate", "chat", source="svamp"),
        Task("math500", "MATH-500", "generate", "chat", source="math500"),
        Task("math500_tools", "MATH-500 (tools)", "generate", "chat", tools=True, source="math500"),
        Task("humaneval", "HumanEval", "generate", "chat", source="humaneval"),
        Task("chat_arc_easy", "ARC-Easy (chat)", "chat_mc", "chat", source="arc_easy"),
        Task("chat_arc_challenge", "ARC-Challenge (chat)", "chat_mc", "chat", source="arc_challenge"),
        Task("mmlu", "MMLU", "chat_mc", "chat", source="mmlu"),
    ]
    # Weak-spot probes: problems (held-out 'val' split) and checkers from chatforge.tasks.synthetic.
    for name, title, kind in PROBES:
        tasks.append(Task(f"probe_{name}", title, "probe", "probes", source=kind))
        tasks.append(Task(f"probe_{name}_tools", f"{title} (tools)", "probe", "probes", tools=True, source=kind))
    # Identity and hallucination: does it name itself and its maker (held-out phrasings of
    # chatforge.tasks.identity); does it refuse questions about people it never saw and answer about
    # people and facts it did (chatforge.tasks.probing, chatforge.tasks.world_facts).
    tasks += [Task("probe_identity", "identity (names itself, its maker)", "identity", "probes"),
              Task("probe_fictional", "withheld fictional people (refuses)", "entity", "probes", source="unknown"),
              Task("probe_fictional_known", "fictional people in pretraining (answers)", "entity", "probes",
                   source="known"),
              Task("probe_known_facts", "well-known facts (answers)", "facts", "probes")]
    return {t.name: t for t in tasks}


# (task name suffix, title, chatforge.tasks.synthetic kind): one pair of tasks per synthetic.KINDS entry.
PROBES = [("letter_count", "letter counting", "letter_count"), ("spelling", "spelling", "spelling"),
          ("reverse", "word reversal", "reverse"), ("decimal_compare", "decimal comparison", "decimal_compare"),
          ("arithmetic", "multi-digit arithmetic", "arithmetic")]
assert sorted(k for _, _, k in PROBES) == sorted(synthetic.KINDS), "a synthetic kind without its probe"
TASKS: dict[str, Task] = _registry()
GROUPS: dict[str, list[str]] = {
    "core": list(mc.CORE_TASKS),
    "base": ["bpb", *mc.CORE_TASKS],
    "chat": [t.name for t in TASKS.values() if t.group == "chat"],
    "probes": [t.name for t in TASKS.values() if t.group == "probes"],
}
GROUPS["all"] = [*GROUPS["base"], *GROUPS["chat"], *GROUPS["probes"]]
CHAT_TOKENS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
BASE_STAGES = (None, "", "pretrain")


def list_tasks() -> str:
    """The task names and groups, for error messages and `--help`."""
    lines = [f"groups: {', '.join(f'{g} ({len(v)})' for g, v in GROUPS.items())}"]
    for group in ("base", "chat", "probes"):
        lines.append(f"{group}: {', '.join(t.name for t in TASKS.values() if t.group == group)}")
    return "\n".join(lines)


def resolve_tasks(names: Sequence[str], chat: bool, why_not_chat: str = "") -> list[Task]:
    """Expand groups and check names. `chat` says whether the checkpoint can run chat tasks. Empty (or
    "all") means every task the checkpoint can run: the base group for a base model, everything for a
    chat model. On a base model the chat tasks of the list are left out (so one list serves every
    checkpoint of a run); a list with nothing it can run is an error that lists what it can run."""
    out: list[str] = []
    for n in (names or ["all"]):
        n = n.strip()
        if n in GROUPS:
            out += GROUPS[n]
        elif n in TASKS:
            out.append(n)
        else:
            raise ChatforgeError(f"unknown eval task {n!r}. Available:\n{list_tasks()}")
    out = list(dict.fromkeys(out))
    runnable = out if chat else [n for n in out if TASKS[n].group == "base"]
    if not runnable:
        raise ChatforgeError(
            f"task(s) {', '.join(out)} need a chat model, but this checkpoint {why_not_chat}. Tasks it can "
            f"run: {', '.join(GROUPS['base'])} (group 'base'); evaluate an sft/rl/rlhf checkpoint for the rest")
    return [TASKS[n] for n in runnable]


def chat_protocol(checkpoint_config: dict, tok) -> tuple[bool, str]:
    """(True, "") when the checkpoint can be asked chat tasks, else (False, why not): its tokenizer
    lacks the chat tokens, or it is a base model (stage pretrain), which has never seen them trained."""
    sp = getattr(tok, "special_tokens", {}) or {}
    missing = [t for t in CHAT_TOKENS if t not in sp]
    if missing:
        return False, f"has a tokenizer without the chat protocol's {missing[0]} token"
    stage = checkpoint_config.get("stage")
    if stage in BASE_STAGES:
        return False, f"is a base model (stage {stage or 'unknown'}) that has not been trained on the chat protocol"
    return True, ""


# ----------------------------------------------------------------------------------------------
# Batched log-likelihood scoring


@dataclass
class ChoiceScore:
    logprob: float  # sum of log p(token | everything before it) over the scored tokens
    tokens: int  # how many tokens were scored
    greedy: bool  # every scored token was the argmax


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all sequences share.

    >>> common_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2]])
    2
    """
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


@torch.no_grad()
def score_continuations(model, questions: Sequence[Sequence[tuple[Sequence[int], int]]], *, batch_rows: int = 32,
                        autocast: Callable = contextlib.nullcontext, on_question: Callable[[int], None] | None = None
                        ) -> list[list[ChoiceScore]]:
    """Score tokens[start:] given tokens[:start] for every choice (tokens, start) of every question.

    Per question, the tokens all its choices share (up to the first scored token) run once; groups of
    questions with up to `batch_rows` choices in all share two forward passes: one over the
    left-padded shared parts (filling the KV cache), one over the right-padded remainders after the
    cache rows are repeated per choice. Every sequence must fit the model's context."""
    device = next(model.parameters()).device
    cfg = model.config
    ctx = cfg.max_seq_len
    plans = []
    for qi, q in enumerate(questions):
        if not q:
            raise ValueError(f"question {qi} has no choices")
        for tokens, start in q:
            if not 1 <= start < len(tokens) <= ctx:
                raise ValueError(f"question {qi}: need 1 <= start < len(tokens) <= context {ctx}, got start {start}, "
                                 f"{len(tokens)} tokens")
        shared = min(common_prefix([t for t, _ in q]), min(s for _, s in q))
        plans.append((shared, max(len(t) for t, _ in q) - shared))
    out: list[list[ChoiceScore]] = [[] for _ in questions]
    i = 0
    while i < len(questions):
        # Grow the group while the rows fit the batch and the longest shared part plus the longest
        # remainder fits the context (the cache is laid out in slots, shared part first).
        j, P, S, rows = i, 0, 0, 0
        while j < len(questions):
            p, s = plans[j]
            n = len(questions[j])
            if j > i and (rows + n > batch_rows or max(P, p) + max(S, s) > ctx):
                break
            P, S, rows, j = max(P, p), max(S, s), rows + n, j + 1
        group = range(i, j)
        shared = [plans[g][0] for g in group]
        pad = torch.tensor([P - p for p in shared], dtype=torch.long, device=device)  # (Q,)
        idx = torch.zeros(len(shared), P, dtype=torch.long, device=device)  # (Q, P), left-padded
        for r, g in enumerate(group):
            first = questions[g][0][0]
            idx[r, P - shared[r]:] = torch.as_tensor(list(first[:shared[r]]), dtype=torch.long)
        cache = KVCache(len(shared), cfg.n_layer, cfg.n_kv_head, cfg.head_dim, P + S,
                        pad=pad if int(pad.max()) > 0 else None)
        with autocast():
            last = model(idx, kv_cache=cache, last_only=True)[:, -1].float()  # (Q, V): predicts token `shared`
        owner = [r for r, g in enumerate(group) for _ in questions[g]]  # question row of every choice row
        cache.reorder(torch.tensor(owner, dtype=torch.long, device=device))
        R = len(owner)
        x = torch.zeros(R, S, dtype=torch.long, device=device)  # (R, S), right-padded remainders
        scored = torch.zeros(R, S, dtype=torch.bool, device=device)
        row = 0
        for r, g in enumerate(group):
            for tokens, start in questions[g]:
                rest = list(tokens[shared[r]:])
                x[row, :len(rest)] = torch.as_tensor(rest, dtype=torch.long)
                scored[row, start - shared[r]:len(rest)] = True
                row += 1
        with autocast():
            logits = model(x, kv_cache=cache).float()  # (R, S, V); position k predicts x[:, k+1]
        # The logits that predict x[:, k]: the prefill's last position for k = 0, else position k-1.
        pred = torch.cat([last[owner][:, None, :], logits[:, :-1]], dim=1)  # (R, S, V)
        logp = pred.gather(-1, x[..., None]).squeeze(-1) - pred.logsumexp(-1)  # (R, S)
        hit = pred.argmax(-1) == x  # (R, S)
        logp_sum = (logp * scored).sum(-1).tolist()
        counts = scored.sum(-1).tolist()
        greedy = (hit | ~scored).all(-1).tolist()
        row = 0
        for g in group:
            for _ in questions[g]:
                out[g].append(ChoiceScore(logp_sum[row], int(counts[row]), bool(greedy[row])))
                row += 1
            if on_question is not None:
                on_question(g)
        i = j
    return out


def encode_item(tok, task: mc.CoreTask, item: mc.MCItem, fewshot: list[mc.MCItem], ctx: int
                ) -> tuple[list[tuple[list[int], int]], int, bool]:
    """(choices as (tokens, start), shots used, cropped). Few-shot examples are dropped from the end
    until every choice fits the context; when even none fits, the context is cut from the left (after
    <|bos|>). A continuation that cannot fit at all raises ValueError."""
    for k in range(len(fewshot), -1, -1):
        enc = [([tok.bos_id] + tok.encode(c), tok.encode(x)) for c, x in mc.render_item(task, item, fewshot[:k])]
        if max(len(c) + len(x) for c, x in enc) <= ctx:
            return [(c + x, len(c)) for c, x in enc], k, False
    if max(len(x) for _, x in enc) > ctx - 2:
        raise ValueError("continuation longer than the context")
    out = []
    for c, x in enc:
        keep = ctx - len(x) - 1
        c = [c[0]] + c[-keep:] if keep < len(c) - 1 else c
        out.append((c + x, len(c)))
    return out, 0, True


# ----------------------------------------------------------------------------------------------
# Tasks


def _subsample(n: int, limit: int, seed: int) -> list[int]:
    """Indices of `limit` items (all when limit is 0), a seeded random subset in file order."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not progress, dynamic_ncols=True, leave=False)


def run_core_task(model, tok, task: mc.CoreTask, meta: dict, *, data_dir: str = "", limit: int = 0, seed: int = 1337,
                  batch_rows: int = 32, autocast: Callable = contextlib.nullcontext, progress: bool = True) -> dict:
    """One task of the in-context suite: accuracy, centred accuracy, and the bookkeeping behind them."""
    t0 = time.time()
    if task.name not in meta:
        return {"status": "missing", "reason": f"{task.name} has no row in {mc.CORE_META} (shots and random "
                                               f"baseline come from it)"}
    try:
        items, bad = mc.load_core_items(task, data_dir)
    except ChatforgeError as e:
        return {"status": "missing", "reason": str(e)}
    if not items:
        return {"status": "missing", "reason": f"{task.path}: no readable records ({bad} bad)"}
    shots, baseline = meta[task.name]["shots"], meta[task.name]["random_baseline"]
    ctx = model.config.max_seq_len
    chosen = _subsample(len(items), limit, seed)
    questions, used, cropped, skipped, golds = [], [], 0, 0, []
    for i in chosen:
        fewshot = [items[k] for k in mc.sample_fewshot(len(items), i, shots, seed)]
        try:
            q, k, cut = encode_item(tok, task, items[i], fewshot, ctx)
        except ValueError:
            skipped += 1
            continue
        questions.append(q)
        used.append(k)
        cropped += cut
        golds.append(items[i].gold)
    bar = _bar(len(questions), task.name, progress)
    scores = score_continuations(model, questions, batch_rows=batch_rows, autocast=autocast,
                                 on_question=lambda _: bar.update(1))
    bar.close()
    correct = 0
    for gold, choice_scores in zip(golds, scores):
        if task.norm == "exact":
            correct += choice_scores[0].greedy
            continue
        values = [s.logprob / s.tokens if task.norm == "mean" else s.logprob for s in choice_scores]
        correct += int(max(range(len(values)), key=values.__getitem__) == gold)
    n = len(questions) + skipped  # a question that cannot fit counts as wrong, not as absent
    acc = correct / n if n else float("nan")
    return {"status": "ok", "kind": task.kind, "accuracy": acc, "centered": mc.centered_accuracy(acc, baseline),
            "random_baseline": baseline, "n": n, "of": len(items), "shots": shots,
            "shots_used": sum(used) / max(len(used), 1), "cropped": cropped, "too_long": skipped,
            "bad_records": bad, "seconds": round(time.time() - t0, 2)}


def core_summary(tasks: dict) -> dict | None:
    """CORE: the mean centred accuracy over the suite's tasks that ran; `complete` says whether all did."""
    ran = {n: r for n, r in tasks.items() if n in mc.CORE_TASKS and r.get("status") == "ok"}
    asked = [n for n in mc.CORE_TASKS if n in tasks]
    if not ran:
        return None
    return {"score": sum(r["centered"] for r in ran.values()) / len(ran), "tasks": list(ran),
            "missing": [n for n in asked if n not in ran], "complete": len(ran) == len(mc.CORE_TASKS)}


def run_bpb(model, tok, *, tokens_dir: Path | None, texts: Sequence[str] = (), data_dir: str = "", max_tokens: int,
            batch_size: int, autocast: Callable = contextlib.nullcontext) -> dict:
    """Bits per byte on held-out text: the pretrain stage's validation split (`tokens_dir`, with the
    unigram baseline from its train counts) or the given text files, tokenized here."""
    from chatforge.dataloader import TokenStream, eval_windows, read_index, train_token_counts

    device = next(model.parameters()).device
    seq_len = model.config.max_seq_len
    token_bytes_np = np.asarray(tok.token_bytes(), dtype=np.int64)
    token_bytes = torch.tensor(token_bytes_np, device=device,
                               dtype=torch.float32 if device.type == "mps" else torch.float64)
    counts = None
    if texts:
        from chatforge.corpus import iter_documents

        ids: list[int] = []
        for doc in iter_documents(list(texts), data_dir, 100_000, 0):
            ids += [tok.bos_id] + tok.encode(doc)
            if len(ids) > max_tokens + seq_len + 1:
                break
        stream, source = TokenStream.from_array(np.asarray(ids, dtype=np.int64), tok.vocab_size), ", ".join(texts)
    else:
        index = read_index(tokens_dir) if tokens_dir is not None else None
        if index is None:
            return {"status": "missing", "reason": f"no held-out text: {tokens_dir} holds no token shards (run the "
                                                   f"pretrain stage of this run, or pass --bpb_text FILES)"}
        if index["vocab_size"] != tok.vocab_size:
            why = f"{index['vocab_size']} tokens, the checkpoint has {tok.vocab_size}"
            return {"status": "missing", "reason": f"{tokens_dir} was tokenized with another vocabulary ({why})"}
        try:
            stream = TokenStream(tokens_dir, index, "val")
            counts = train_token_counts(tokens_dir)
        except (ChatforgeError, OSError) as e:
            return {"status": "missing", "reason": str(e)}
        source = f"{tokens_dir} (validation split)"
    try:
        windows = eval_windows(stream, seq_len, max_tokens)
    except ChatforgeError as e:
        return {"status": "missing", "reason": str(e)}
    bpb = evaluate_bpb(model, stream, windows, seq_len, batch_size, token_bytes, device, autocast)
    out = {"status": "ok", "bpb": bpb, "tokens": int(len(windows) * seq_len), "source": source}
    if counts is not None:
        out["unigram_bpb"] = unigram_bpb(counts, stream, windows, seq_len, token_bytes_np)
    return out


def _load_chat_items(task: Task, data_dir: str) -> list[dict]:
    """{messages, answer, ...} per item of a chat task."""
    from chatforge.tasks import gsm8k as G
    from chatforge.tasks import humaneval as H
    from chatforge.tasks import math as M

    if task.source == "gsm8k":
        return [{**it, "messages": G.word_problem_prompt(it["question"])} for it in G.load_gsm8k("test", data_dir)]
    if task.source == "svamp":
        return [{**it, "messages": G.word_problem_prompt(it["question"])} for it in G.load_svamp(data_dir)]
    if task.source == "math500":
        return [{**it, "messages": M.math_prompt(it["question"])} for it in M.load_math500(data_dir)]
    if task.source == "humaneval":
        return [{**p, "question": p["task_id"], "messages": H.humaneval_prompt(p)} for p in H.load_humaneval(data_dir)]
    if task.source in ("arc_easy", "arc_challenge"):
        items = mc.load_arc_chat(task.source.split("_")[1], data_dir)
    else:
        items = mc.load_mmlu("test", data_dir)
    return [{**it, "messages": mc.mc_chat_prompt(it["question"], it["choices"], it.get("subject", ""))} for it in items]


def check_reply(task: Task, item: dict, reply: str, python_timeout: float = 5.0) -> tuple[bool, str | None]:
    """(correct, what was extracted) for one reply to one item."""
    from chatforge.tasks import gsm8k as G
    from chatforge.tasks import humaneval as H
    from chatforge.tasks import math as M

    if task.source in ("gsm8k", "svamp"):
        got = G.extract_gsm8k_answer(reply)
        return G.numbers_equal(got, item["answer"]), got
    if task.source == "math500":
        got = M.extract_math_answer(reply)
        return M.math_answers_equal(got, item["answer"]), got
    if task.source == "humaneval":
        ok, why = H.check_program(H.build_program(item, reply), python_timeout)
        return ok, "passed" if ok else why
    if task.kind == "chat_mc":
        got = mc.extract_choice_letter(reply, len(item["choices"]))
        return got == item["answer"], got
    if task.kind == "probe":
        ok = synthetic.check_answer(task.source, reply, item["answer"])
        return ok, synthetic.extract_answer(reply)
    if task.kind == "identity":
        named = [w for w in ("name", "maker") if item.get(w) and _mentions(reply, item[w])]
        return len(named) == sum(bool(item.get(w)) for w in ("name", "maker")), ", ".join(named) or "neither"
    if task.kind in ("entity", "facts"):
        if probing.is_refusal(reply):
            return task.source == "unknown", "refused"
        right = any(probing.normalized_match(item["question"], a, reply) for a in item["variants"])
        return right and task.source != "unknown", "answered" if right else "answered wrong"
    raise ValueError(f"no checker for task {task.name}")


def _mentions(reply: str, what: str) -> bool:
    """Whether the reply names `what` (as whole words, any case; a leading "the" is optional).

    >>> _mentions("I was made by The Chatforge Project.", "the chatforge project"), _mentions("chatforged", "chatforge")
    (True, False)
    """
    words = re.sub(r"^the\s+", "", what.strip(), flags=re.IGNORECASE)
    return re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words.split())) + r"(?!\w)", reply, re.IGNORECASE) is not None


def identity_card(sft_config: dict | None) -> identity.IdentityCard:
    """The identity card SFT taught, from the sft stage's config.json: an `identity` table or flat
    `identity_<field>` entries (name, maker, ...); the IdentityCard defaults where it has none."""
    cfg = sft_config or {}
    fields = {f: cfg[f"identity_{f}"] for f in identity.IdentityCard.__dataclass_fields__ if f"identity_{f}" in cfg}
    if isinstance(cfg.get("identity"), dict):
        fields.update({k: v for k, v in cfg["identity"].items() if k in identity.IdentityCard.__dataclass_fields__})
    return identity.IdentityCard(**fields)


def _identity_items(card: identity.IdentityCard, data_dir: str, seed: int) -> list[dict]:
    """Held-out ('val') identity phrasings whose answer names the assistant: the reply must name it (and
    its maker when asked who made it); the same questions under a system prompt that assigns another
    identity, which the reply must follow; LLaMA-Factory's val questions, requiring what their answer
    (filled from the card) names."""
    asks = {"name": ("name",), "maker": ("name", "maker"), "abilities": ("name",), "greeting": ("name",)}
    val = [(t, q) for t, qs in identity.QUESTIONS.items() if t in asks for q in qs
           if split_of("identity:" + q, 0.2) == "val"]

    def item(messages, name, maker, need):
        return {"messages": messages, "question": messages[-1]["content"], "name": name if "name" in need else "",
                "maker": maker if "maker" in need else "", "answer": " / ".join(w for w in need)}

    out = [item([{"role": "user", "content": q}], card.name, card.maker, asks[t]) for t, q in val]
    try:
        pairs = identity.llama_factory_pairs(card, data_dir)
    except (ChatforgeError, OSError):
        pairs = []  # the dataset file is optional: the template phrasings above still run
    for q, a in pairs:
        need = tuple(w for w in ("name", "maker") if _mentions(a, getattr(card, w)))
        if need and split_of("identity:" + q, 0.2) == "val":
            out.append(item([{"role": "user", "content": q}], card.name, card.maker, need))
    rng = random.Random(f"identity-probe|{seed}")
    for t, q in val:
        if t in ("name", "maker"):
            # another identity: never the card's own (a run may name its assistant "Orion")
            name = rng.choice([n for n in identity.OTHER_NAMES if n != card.name])
            maker = rng.choice([m for m in identity.OTHER_MAKERS if m != card.maker])
            system = f"You are {name}, an AI assistant made by {maker}."
            out.append(item([{"role": "system", "content": system}, {"role": "user", "content": q}], name, maker,
                            asks[t]))
    return out


def _entity_items(task: Task, facts: str | os.PathLike | None, n: int, seed: int) -> list[dict]:
    """Questions about fictional people (probing.entity_questions): the run's facts file splits them into
    known (biographies in pretraining) and withheld; without one, every person is invented here and
    so withheld. With a facts file, `group` 'heldout' marks people kept out of SFT's probing
    conversations too."""
    if facts:
        known, unknown = probing.read_facts(facts)
    elif task.source == "known":
        raise ChatforgeError("no facts file: this run has no fictional people in its pretraining text (run the "
                             "facts stage before pretraining to get this probe)")
    else:
        known, unknown = [], probing.make_entities(max(1, -(-n // 3)), seed=f"eval|{seed}")  # type: ignore[arg-type]
    people = known if task.source == "known" else unknown
    items = []
    for e in people:
        # SFT's probing conversations use the facts file's 'train' people (probing.entity_split)
        group = {"group": "heldout" if probing.entity_split(e) == "val" else "sft"} if facts else {}
        items += [{"question": q.question, "answer": q.answer, "variants": [q.answer],
                   "messages": [{"role": "user", "content": q.question}], **group} for q in probing.entity_questions(e)]
    return [items[i] for i in _subsample(len(items), n, seed)]


def _fact_items() -> list[dict]:
    return [{"question": q.question, "answer": q.answer, "variants": world_facts.answer_variants(q.answer),
             "messages": [{"role": "user", "content": q.question}]} for q in world_facts.world_fact_questions()]


def _probe_items(task: Task, n: int, seed: int) -> list[dict]:
    """n problems of the probe's synthetic kind from the held-out 'val' split (words and operand tuples
    that SFT's synthetic conversations never use), each asked as one user turn."""
    return [{"question": p.prompt, "answer": p.answer, "messages": [{"role": "user", "content": p.prompt}]}
            for p in synthetic.make_problems(task.source, n, "val", seed)]


def run_generation_task(engine, task: Task, items: list[dict], *, limit: int = 0, seed: int = 1337,
                        batch_size: int = 16, max_tokens: int = 512, python_timeout: float = 5.0,
                        progress: bool = True, examples: int = 3) -> dict:
    """Greedy replies through the engine, batched, then the task's checker. Returns accuracy (pass@1
    for HumanEval), counts, tool use, and the first `examples` replies for the report."""
    t0 = time.time()
    tok, ctx = engine.tok, engine.config.max_seq_len
    chosen = [items[i] for i in _subsample(len(items), limit, seed)]
    correct = too_long = tool_calls = refused = 0
    groups: dict[str, list[int]] = {}  # group -> [correct, n], for items that carry a "group"
    shown: list[dict] = []
    bar = _bar(len(chosen), task.name, progress)
    for b in range(0, len(chosen), batch_size):
        batch = chosen[b:b + batch_size]
        encoded = [(it, tok.render_prompt(it["messages"])) for it in batch]
        runnable = [(it, ids) for it, ids in encoded if len(ids) < ctx - 1]  # room for a reply
        too_long += len(batch) - len(runnable)  # counted as wrong
        completions = engine.generate([ids for _, ids in runnable], max_tokens=max_tokens, temperature=0.0,
                                      seed=seed, use_tools=task.tools) if runnable else []
        for (it, _), c in zip(runnable, completions):
            ok, got = check_reply(task, it, c.text, python_timeout)
            correct += ok
            refused += got == "refused"
            if "group" in it:
                g = groups.setdefault(it["group"], [0, 0])
                g[0], g[1] = g[0] + ok, g[1] + 1
            tool_calls += len(c.tool_calls)
            if len(shown) < examples:
                shown.append({"question": str(it.get("question", ""))[:300], "reply": c.text[:500],
                              "extracted": got, "answer": it.get("answer") if task.source != "humaneval" else None,
                              "correct": bool(ok)})
        bar.update(len(batch))
    bar.close()
    n = len(chosen)
    out = {"status": "ok", "kind": task.kind, "accuracy": correct / n if n else float("nan"), "correct": correct,
           "n": n, "of": len(items), "too_long": too_long, "tool_calls": tool_calls, "tools": task.tools,
           "max_tokens": max_tokens, "examples": shown, "seconds": round(time.time() - t0, 2)}
    if task.kind in ("entity", "facts"):
        out["refusal_rate"] = refused / n if n else float("nan")
    if groups:
        out["groups"] = {g: {"correct": c, "n": m, "accuracy": c / m} for g, (c, m) in sorted(groups.items())}
    return out


# ----------------------------------------------------------------------------------------------
# A whole checkpoint -> eval.json


def checkpoint_id(path: Path) -> dict:
    """What identifies the weights evaluated: the step and the weight file's size and mtime."""
    cfg = json.loads((path / "config.json").read_text())
    w = path / "model.safetensors"
    st = w.stat() if w.exists() else None
    return {"step": cfg.get("step"), "stage": cfg.get("stage"), "weights_bytes": st.st_size if st else None,
            "weights_mtime": int(st.st_mtime) if st else None}


def read_eval(path: str | os.PathLike) -> dict:
    """An eval.json, or a ChatforgeError that names the file and the fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatforgeError(f"{path} not found; run `chatforge eval` for that checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path} is not valid JSON ({e}); it was cut off or edited. Delete it and rerun "
                             f"`chatforge eval` for that checkpoint") from None
    if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT or not isinstance(data.get("tasks"), dict):
        raise ChatforgeError(f"{path} is not a chatforge eval file (no \"format\": {EVAL_FORMAT} and \"tasks\"); "
                             f"delete it and rerun `chatforge eval` for that checkpoint")
    return data


def evaluate_checkpoint(checkpoint: str | os.PathLike, tasks: Sequence[str], out_path: str | os.PathLike, *,
                        label: str = "", data_dir: str = "", limit: int = 0, seed: int = 1337,
                        batch_size: int = 16, max_tokens: int = 512, tokens_dir: str | os.PathLike | None = None,
                        bpb_text: Sequence[str] = (), bpb_tokens: int = 1 << 20, python_timeout: float = 5.0,
                        probe_n: int = 100, identity_card: identity.IdentityCard | None = None,
                        facts: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
                        force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Evaluate one checkpoint on `tasks` (names or groups; empty = what it can run) and write eval.json
    after every task. Returns the eval.json content. `identity_card`: who the identity probe expects
    (default IdentityCard()); `facts`: the run's facts file (known / withheld fictional people)."""
    from chatforge.checkpoint import load_checkpoint
    from chatforge.common import get_device
    from chatforge.engine import Engine
    from chatforge.tokenizer import Tokenizer

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    dev = get_device(device)
    model, info = load_checkpoint(checkpoint, dev)
    model.eval()
    if info["tokenizer_dir"] is None:
        raise ChatforgeError(f"checkpoint {checkpoint} has no tokenizer/ folder; evaluation needs it to encode text")
    tok = Tokenizer.load(info["tokenizer_dir"])
    if tok.vocab_size != info["model_config"].vocab_size:
        raise ChatforgeError(f"checkpoint {checkpoint}: its tokenizer has {tok.vocab_size} tokens but the model's "
                             f"vocabulary is {info['model_config'].vocab_size}; the folder mixes two models")
    chat_ok, why = chat_protocol(info["config"], tok)
    todo = resolve_tasks(tasks, chat_ok, why)
    left_out = [n for n in resolve_tasks(tasks, True) if n not in todo]
    if left_out:
        log(f"eval: {label or checkpoint}: leaving out {len(left_out)} chat task(s) ({', '.join(t.name for t in left_out)}): "
            f"this checkpoint {why}")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ChatforgeError(f"--dtype {dtype}: choose auto, float32 or bfloat16")
    bf16 = amp_dtype(dtype, dev) is not None
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    card = identity_card or identity.IdentityCard()
    ident = checkpoint_id(checkpoint)
    result = {"format": EVAL_FORMAT, "checkpoint": str(checkpoint), "label": label or ident["stage"] or "",
              "id": ident, "chat": chat_ok, "params": sum(p.numel() for p in model.parameters()),
              "settings": {"limit": limit, "seed": seed, "max_tokens": max_tokens, "bpb_tokens": bpb_tokens,
                           "bpb_text": list(bpb_text), "probe_n": probe_n, "dtype": "bfloat16" if bf16 else "float32",
                           "identity": {"name": card.name, "maker": card.maker}, "facts": str(facts) if facts else None},
              "tasks": {}, "core": None, "complete": False}
    if out_path.exists() and not force:
        try:
            old = read_eval(out_path)
        except ChatforgeError as e:
            log(f"eval: ignoring the unreadable {out_path} ({e}); evaluating again")
            old = {}
        if old.get("id") == ident and old.get("settings") == result["settings"]:
            result["tasks"] = {k: v for k, v in old["tasks"].items() if v.get("status") == "ok"}
    t_start = time.time()
    meta = mc.read_core_meta(data_dir) if any(t.kind == "core" for t in todo) else {}
    data_root = data_root_of(data_dir)
    engine = None
    for task in todo:
        if task.name in result["tasks"]:
            log(f"eval: {task.name}: kept from {out_path}")
            continue
        t0 = time.time()
        if task.kind == "bpb":
            res = run_bpb(model, tok, tokens_dir=Path(tokens_dir) if tokens_dir else None, texts=bpb_text,
                          data_dir=data_dir, max_tokens=bpb_tokens, batch_size=batch_size, autocast=autocast)
        elif task.kind == "core":
            res = (run_core_task(model, tok, mc.CORE_TASKS[task.source], meta, data_dir=data_dir, limit=limit,
                                 seed=seed, batch_rows=batch_size, autocast=autocast, progress=progress)
                   if meta else {"status": "missing", "reason": f"{mc.CORE_META} not found in the data dir "
                                                                f"{data_root} (the suite's shots and random baselines "
                                                                f"come from it; `chatforge data download core_meta`)"})
        else:
            try:
                if task.kind == "probe":
                    items = _probe_items(task, limit or probe_n, seed)
                elif task.kind == "identity":
                    items = _identity_items(card, data_dir, seed)
                elif task.kind == "entity":
                    items = _entity_items(task, facts, limit or probe_n, seed)
                elif task.kind == "facts":
                    items = _fact_items()
                else:
                    items = _load_chat_items(task, data_dir)
            except ChatforgeError as e:
                items, res = None, {"status": "missing", "reason": str(e)}
            if items is not None:
                if engine is None:
                    engine = Engine(model, tok, tools=_eval_tools(python_timeout), device=dev)
                short = {"chat_mc": 32, "identity": 64, "entity": 64, "facts": 64}  # a letter, a sentence
                res = run_generation_task(engine, task, items, limit=0 if task.kind in ("probe", "entity") else limit,
                                          seed=seed, batch_size=batch_size,
                                          max_tokens=min(max_tokens, short.get(task.kind, max_tokens)),
                                          python_timeout=python_timeout, progress=progress)
        res.setdefault("seconds", round(time.time() - t0, 2))
        result["tasks"][task.name] = res
        result["core"] = core_summary(result["tasks"])
        write_json(out_path, result)
        log(f"eval: {task.name}: {describe(task, res)}")
    result["core"] = core_summary(result["tasks"])
    result["complete"] = True
    result["seconds"] = round(time.time() - t_start, 2)
    write_json(out_path, result)
    return result


def _eval_tools(python_timeout: float) -> dict:
    """The tools a `_tools` task may call: the python sandbox alone (search needs an index and is
    not what these tasks measure)."""
    from chatforge.tools.python_sandbox import SandboxLimits, python_tool

    return {"python": python_tool(SandboxLimits(timeout_s=python_timeout, cpu_s=max(1, int(python_timeout) + 1)))}


def describe(task: Task, res: dict) -> str:
    """One line for the terminal."""
    if res.get("status") != "ok":
        return f"{res.get('status')}: {res.get('reason', '')}"
    if task.kind == "bpb":
        uni = f" (unigram {res['unigram_bpb']:.4f})" if res.get("unigram_bpb") else ""
        return f"{res['bpb']:.4f} bits/byte{uni} on {res['tokens']:,} tokens"
    if task.kind == "core":
        return (f"accuracy {res['accuracy']:.3f}, centred {res['centered']:+.3f} on {res['n']} of {res['of']} "
                f"({res['shots_used']:.1f} of {res['shots']} shots fit)")
    return f"accuracy {res['accuracy']:.3f} ({res['correct']}/{res['n']}), {res['seconds']:.0f}s"

