"""`chatforge sft`: supervised fine-tuning of a base checkpoint into a chat model.

    chatforge sft --preset tiny                          # full fine-tuning of runs/tiny/pretrain/checkpoint
    chatforge sft --preset tiny --lora_rank 8 --replay 0.25 --run tiny_lora
    chatforge sft --preset tiny --forgetting_grid true   # + {full, LoRA} x {replay on, off}

Wiring only: the conversation sources and the mixture (chatforge/tasks/*), knowledge probing against
hallucination (tasks/probing.py: the source model is sampled on the facts stage's questions; answers
where it is right, refusals where it is not), LoRA (lora.py), the assistant-only loss and LoRA
checkpoints (finetune.py, losses.py), the one training loop (train_loop.py), the checks after training
(tasks/chat_checks.py, tasks/probing.py, evaluate.run_bpb).

Outputs in runs/<run>/sft/:

    checkpoint/       the chat model (merged weights for LoRA, plus lora_adapters.safetensors), optimizer,
                      state (step, data position, RNG): `chatforge chat runs/<run>/sft/checkpoint`
    adapter/          LoRA runs: the adapters in PEFT format (loads onto the HF export)
    probe/            probe_results.jsonl, probe_counts.json (the probing that made the refusal data)
    metrics.jsonl     per-step loss, eval (val_loss), samples, and events: mixture (per-source counts:
                      read, skipped by reason, too long, tokens), probe, checks
    loss.png          training loss and validation loss
    summary.json      every measurement (also in DONE)
    forgetting.json/.md   the 2x2 table, with --forgetting_grid
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
from pathlib import Path

import torch

from chatforge.common import ChatforgeError, is_complete, log0, read_done, source_checkpoint, stage_dir, \
    stage_run, write_json
from chatforge.config import ConfigError, SftConfig
from chatforge.distributed import training_process

SAMPLE_PROMPTS = ["Who are you?", "How many r's are in the word strawberry?"]


def run(cfg: SftConfig) -> dict:
    check_config(cfg)
    with training_process(cfg.threads, cfg.device) as (d, device):
        return _run(cfg, d, device)


def check_config(cfg: SftConfig) -> None:
    """Range checks before anything is loaded: one ConfigError naming the flag."""
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be {what}")
    need(cfg.overflow in ("drop", "truncate"), "overflow", "drop or truncate")
    need(cfg.max_seq_len >= 0, "max_seq_len", "0 (the checkpoint's) or a context length")
    for w in ("oasst", "self_instruct", "glaive", "bfcl", "gsm8k_tools"):
        need(getattr(cfg, w) >= 0, w, "a weight >= 0")
    for n in ("synthetic", "identity", "search", "val_conversations", "num_steps", "lora_rank", "check_n",
              "grid_steps"):
        need(getattr(cfg, n) >= 0, n, "at least 0")
    need(0 <= cfg.replay < 1, "replay", "a share of rows in [0, 1)")
    need(cfg.device_batch_size >= 1, "device_batch_size", "at least 1")
    need(cfg.grad_accum >= 1, "grad_accum", "at least 1")
    need(cfg.num_epochs > 0, "num_epochs", "positive")
    need(0 < cfg.lr_frac <= 10, "lr_frac", "in (0, 10]")
    need(0 <= cfg.warmdown_ratio <= 1, "warmdown_ratio", "in [0, 1]")
    need(cfg.probe_k >= 1, "probe_k", "at least 1")
    need(0 < cfg.probe_threshold <= 1, "probe_threshold", "in (0, 1]")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16")
    if cfg.replay > 0 and round(cfg.replay * cfg.device_batch_size) in (0, cfg.device_batch_size):
        raise ConfigError(f"--replay {cfg.replay} with --device_batch_size {cfg.device_batch_size} leaves no "
                          f"{'replay' if cfg.replay < 0.5 else 'SFT'} row; raise the batch size or change the share")


def _run(cfg: SftConfig, d, device) -> dict:
    from chatforge.checkpoint import load_checkpoint
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, "sft")
    if is_complete(out) and not cfg.force:
        log0(f"sft: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return read_done(out)
    src = source_checkpoint(cfg, cfg.source)
    base, info = load_checkpoint(src, "cpu")
    if info["tokenizer_dir"] is None:
        raise ChatforgeError(f"{src} has no tokenizer/ folder; SFT needs the checkpoint's own tokenizer")
    tok = Tokenizer.load(info["tokenizer_dir"])
    seq_len = cfg.max_seq_len or base.config.max_seq_len
    ckpt = out / "checkpoint"
    if cfg.force and d.master:
        shutil.rmtree(ckpt, ignore_errors=True)
        for f in ("metrics.jsonl", "summary.json", "forgetting.json", "forgetting.md"):
            (out / f).unlink(missing_ok=True)
    resume = cfg.resume and not cfg.force and (ckpt / "state.json").exists()
    with (stage_run(cfg, "sft") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        return _stage(cfg, d, device, out, src, base, info, tok, seq_len, resume, log, srun)


def _stage(cfg, d, device, out, src, base, info, tok, seq_len, resume, log, srun) -> dict:
    from chatforge.tasks.mixture import mixture_metrics

    # 1. Data: the mixture (probing the source model first), held-out conversations.
    amp_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda") else None
    base_dev = copy.deepcopy(base).to(device).eval()
    probe_out = _probe_source(cfg, base_dev, tok, device, out) if cfg.probe else None
    rows, val_rows, counts = build_data(cfg, tok, seq_len, probe_out)
    log(event="mixture", rows=len(rows), val_rows=len(val_rows), seq_len=seq_len, sources=mixture_metrics(counts))
    log0(describe_mixture(counts, len(rows), len(val_rows), seq_len))
    if probe_out:
        log(event="probe", **probe_out["counts"])

    # 2. Before: what the source model knows (controlled probe, as a base model) and its bpb.
    before = {}
    if cfg.checks and d.master:
        before = _measure_base(cfg, base_dev, tok, device, seq_len, amp_dtype)
        log(event="before", **before)
    del base_dev

    # 3. Train the main cell.
    lora, replay = cfg.lora_rank > 0, cfg.replay
    model, state, cell = train_cell(cfg, d, device, out, src, base, info, tok, seq_len, rows, val_rows,
                                    lora=lora, replay=replay, num_steps=cfg.num_steps, resume=resume, log=log,
                                    checkpoint=True, amp_dtype=amp_dtype)
    summary = {"source": str(src), "seq_len": seq_len, "mixture": mixture_metrics(counts), "rows": len(rows),
               "val_rows": len(val_rows), **cell, "checkpoint": str(out / "checkpoint")}
    if probe_out:
        summary["probe"] = probe_out["counts"]

    # 4. After: the checks, the forgetting grid.
    if cfg.checks and d.master:
        after = _measure_chat(cfg, model, tok, device, seq_len, amp_dtype)
        log(event="checks", **after)
        summary["before"], summary["after"] = before, after
        if "bpb" in before and "bpb" in after:
            cell["bpb_before"], cell["bpb_after"] = before["bpb"], after["bpb"]
    if cfg.forgetting_grid:
        grid = [cell]
        for g_lora, g_replay in _grid_cells(lora, replay):
            log0(f"\nsft: forgetting grid cell {_cell_name(g_lora, g_replay)}")
            g_model, _, g_cell = train_cell(cfg, d, device, out, src, base, info, tok, seq_len, rows, val_rows,
                                            lora=g_lora, replay=g_replay, num_steps=cfg.grid_steps or cell["steps"],
                                            resume=False, log=None, checkpoint=False, amp_dtype=amp_dtype)
            if d.master:
                g_cell["bpb_before"] = before.get("bpb")
                g_cell["bpb_after"] = _bpb(cfg, g_model, tok, seq_len, amp_dtype).get("bpb")
            grid.append(g_cell)
            del g_model
        if d.master:
            summary["forgetting"] = write_forgetting(out, grid)
    if d.master:
        write_json(out / "summary.json", summary)
        srun.close()
        try:
            from chatforge.plots import plot_metrics

            summary["plot"] = str(plot_metrics(out / "metrics.jsonl", out / "loss.png", ["loss", "eval/val_loss"],
                                               title=f"SFT ({cell['name']})"))
        except ImportError:
            log0("matplotlib is not installed: no loss.png (pip install matplotlib)")
        srun.finish(summary)
        log0(report_lines(summary))
    return summary


# ----------------------------------------------------------------------------------------------
# Data


def _probe_source(cfg, model, tok, device, out: Path) -> dict | None:
    """Sample the source model (as a base model: "Question: ...\\nAnswer:") k times on the questions about
    the facts stage's people of the SFT split; label each question known/unknown; save the results."""
    from chatforge.engine import Engine
    from chatforge.tasks.probing import engine_sampler, entity_questions, entity_split, probe, read_facts, \
        save_probe_results

    facts_dir = stage_dir(cfg, "facts")
    if not is_complete(facts_dir):
        log0(f"sft: no facts stage in run '{cfg.run}' ({facts_dir}): no probing conversations "
             f"(run `chatforge facts --run {cfg.run}` before pretraining, or pass --probe false)")
        return None
    known, unknown = read_facts(facts_dir / "facts.jsonl")
    people = [e for e in known + unknown if entity_split(e) == "train"]
    questions = [q for e in people for q in entity_questions(e)]
    engine = Engine(model, tok, tools={}, device=device)
    sampler = engine_sampler(engine, chat=False, max_tokens=16, temperature=1.0, seed=cfg.seed)
    results = probe(questions, sampler, k=cfg.probe_k, threshold=cfg.probe_threshold)
    counts = save_probe_results(out / "probe", results, {"people": len(people), "k": cfg.probe_k,
                                                          "threshold": cfg.probe_threshold})
    return {"results": results, "counts": counts, "known": known, "unknown": unknown}


def build_data(cfg, tok, seq_len: int, probe_out: dict | None):
    """(train rows, held-out rows, per-source counts): every source's train split through the mixture,
    rendered to at most seq_len + 1 tokens; held-out rows from the same sources' val splits."""
    from chatforge.tasks import conversations as C
    from chatforge.tasks.identity import IdentityCard, identity_conversations
    from chatforge.tasks.mixture import Source, build_mixture, render_mixture
    from chatforge.tasks.probing import probe_conversations
    from chatforge.tasks.synthetic import synthetic_conversations

    card = IdentityCard(name=cfg.identity_name, maker=cfg.identity_maker)
    dd, ct = cfg.data_dir, cfg.compact_tools
    index = stage_dir(cfg, "index") / "search.sqlite"

    def sources(split: str) -> list:
        out = []

        def add(name, weight, make):
            if weight > 0:
                st = C.SourceStats(name)
                out.append(Source(name, lambda: make(st), weight if split == "train" else 1.0, st))

        add("oasst", cfg.oasst, lambda st: C.oasst_conversations(data_dir=dd, split=split, stats=st))
        add("self_instruct", cfg.self_instruct, lambda st: C.self_instruct_conversations(data_dir=dd, split=split, stats=st))
        add("glaive", cfg.glaive, lambda st: C.glaive_conversations(data_dir=dd, split=split, stats=st, compact_tools=ct))
        add("bfcl", cfg.bfcl, lambda st: C.bfcl_conversations(data_dir=dd, split=split, stats=st, compact_tools=ct))
        add("gsm8k_tools", cfg.gsm8k_tools, lambda st: C.gsm8k_tool_conversations(data_dir=dd, split=split, stats=st))
        n_val = max(1, cfg.val_conversations // 10)
        if cfg.synthetic:
            out.append(Source("synthetic", lambda: synthetic_conversations(
                cfg.synthetic_kinds, cfg.synthetic if split == "train" else n_val, split, cfg.seed)))
        if cfg.identity:
            out.append(Source("identity", lambda: identity_conversations(
                card, cfg.identity if split == "train" else n_val, split, cfg.seed, dd)))
        if cfg.search and index.exists():
            from chatforge.tasks.search_qa import search_conversations

            out.append(Source("search", lambda: search_conversations(
                index, cfg.search if split == "train" else n_val, split, cfg.seed,
                count_tokens=lambda s: len(tok.encode(s)))))
        if probe_out and split == "train":
            out.append(Source("probe", probe_conversations(probe_out["results"], cfg.seed)))
        return out

    items, counts = build_mixture(sources("train"), cfg.seed)
    rows = render_mixture(tok, items, seq_len + 1, cfg.overflow, counts)
    val_items, val_counts = build_mixture(sources("val"), cfg.seed)
    val_items = val_items[:cfg.val_conversations]  # shuffled: a share of every source
    val_rows = render_mixture(tok, val_items, seq_len + 1, cfg.overflow, val_counts)
    if not rows:
        raise ChatforgeError("the SFT mixture is empty: every source is off or every conversation was skipped "
                             "(see the counts above); turn a source on or raise --max_seq_len")
    if not val_rows:
        raise ChatforgeError("no held-out conversation survived rendering; raise --val_conversations or --max_seq_len")
    return rows, val_rows, counts


def describe_mixture(counts: dict, n_rows: int, n_val: int, seq_len: int) -> str:
    lines = [f"sft mixture: {n_rows:,} training conversations, {n_val:,} held out, context {seq_len}"]
    for name, c in counts.items():
        skipped = dict(c.get("skipped", {}))
        lines.append(f"  {name:14s} used {c.get('used', 0):5,}  trained tokens {c.get('trained_tokens', 0):8,}"
                     + (f"  skipped {skipped}" if skipped else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training one cell ({full, LoRA} x {replay on, off})


def _cell_name(lora: bool, replay: float) -> str:
    return f"{'lora' if lora else 'full'}{f'+replay{replay:g}' if replay > 0 else ''}"


def _grid_cells(lora: bool, replay: float) -> list[tuple[bool, float]]:
    share = replay if replay > 0 else 0.25
    return [(lo, r) for lo in (False, True) for r in (0.0, share) if (lo, r) != (lora, replay)]


def train_cell(cfg, d, device, out, src, base, info, tok, seq_len, rows, val_rows, *, lora: bool, replay: float,
               num_steps: int, resume: bool, log, checkpoint: bool, amp_dtype):
    """Fine-tune a copy of `base` on `rows` through the training loop. Returns (model with LoRA merged,
    TrainState, a summary of the cell)."""
    from chatforge.checkpoint import load_checkpoint
    from chatforge.finetune import AdapterCheckpointer, extend_context, held_out_loss, load_adapters, sft_loss, \
        sft_optimizer
    from chatforge.lora import apply_lora, count_parameters, export_peft_adapter, merge_lora
    from chatforge.optim import lr_multiplier
    from chatforge.rng import seed_everything
    from chatforge.tasks.mixture import ConversationLoader, ReplayLoader, iter_conversation_batches
    from chatforge.train_loop import Checkpointer, LoopConfig, Trainer, prepare_model

    B = cfg.device_batch_size
    n_replay = round(replay * B) if replay > 0 else 0
    n_sft = B - n_replay
    loader = ConversationLoader(rows, n_sft, seq_len, rank=d.rank, world_size=d.world, grad_accum=cfg.grad_accum,
                                seed=cfg.seed, device=device)
    batches = loader
    if n_replay:
        batches = ReplayLoader(loader, _replay_loader(cfg, tok, n_replay, seq_len, d, device))
    steps = num_steps or max(1, math.ceil(cfg.num_epochs * len(loader)))
    seed_everything(cfg.seed)
    ck_path = out / "checkpoint"
    resume_info = None
    if resume:
        if lora:  # the source weights + this run's adapters: exactly the training state
            model = extend_context(copy.deepcopy(base), seq_len)
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
            load_adapters(model, ck_path)
            _, resume_info = load_checkpoint(ck_path, "cpu")
        else:
            model, resume_info = load_checkpoint(ck_path, "cpu")
        ts = resume_info["train_state"] or {}
        for key, mine in (("lora_rank", cfg.lora_rank), ("replay_rows", n_replay), ("source", str(src))):
            if key in ts and ts[key] != mine:
                raise ChatforgeError(f"{ck_path} was trained with {key} {ts[key]!r}, this run has {mine!r}; keep the "
                                     f"settings to resume or pass --force to start over")
    else:
        model = extend_context(copy.deepcopy(base), seq_len)
        if lora:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    trainable, total = count_parameters(model)
    model = model.to(device)
    prepared = prepare_model(model, d, device)
    opt = sft_optimizer(model, lora=lora, lr_frac=cfg.lr_frac, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                        unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr, lora_lr=cfg.lora_lr)
    name = _cell_name(lora, replay)
    meta = {"stage": "sft", "run": cfg.run, "source": str(src), "cell": name}
    extra = {"lora_rank": cfg.lora_rank, "replay_rows": n_replay, "source": str(src)}
    ck = None
    if checkpoint:
        kind = AdapterCheckpointer if lora else Checkpointer
        ck = kind(ck_path, tokenizer_dir=info["tokenizer_dir"], meta=meta, extra_state=extra)

    def evaluate(t) -> dict:
        r = held_out_loss(model, iter_conversation_batches(val_rows, B, seq_len, device=device), t.autocast)
        t.write(f"step {t.state.step:,}: val loss {r['val_loss']:.4f} ({r['val_tokens']:,} held-out tokens)")
        return r

    def sample(t) -> list[str]:
        return chat_samples(model, tok, SAMPLE_PROMPTS, device, lora)

    warmdown = round(cfg.warmdown_ratio * steps)
    trainer = Trainer(prepared, opt, sft_loss, batches,
                      LoopConfig(num_steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                 eval_every=cfg.eval_every, sample_every=cfg.sample_every,
                                 checkpoint_every=cfg.checkpoint_every if checkpoint else 0, best_metric="val_loss",
                                 name=f"sft {name}", diverge_hint="lower --lr_frac / --lora_lr, or check the data"),
                      dist=d, device=device, amp_dtype=amp_dtype, evaluate=evaluate,
                      sample=sample if log is not None else None, checkpointer=ck, log=log,
                      lr_schedule=lambda step: lr_multiplier(step, steps, 0, warmdown, 0.0))
    if resume_info is not None:
        trainer.resume(resume_info)
    state = trainer.run()
    if lora:
        if checkpoint and d.master:
            export_peft_adapter(model, out / "adapter")
        merge_lora(model)
    model.eval()
    cell = {"name": name, "lora": lora, "replay": replay, "replay_rows": n_replay, "steps": state.step,
            "trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total,
            "val_loss": state.metrics.get("val_loss"), "train_loss": state.last_loss,
            "train_seconds": round(state.train_time, 2), "tokens": state.tokens,
            "tokens_per_s": state.tokens / state.train_time if state.train_time else None}
    return model, state, cell


def _replay_loader(cfg, tok, rows: int, seq_len: int, d, device):
    """Pretraining windows of the source run's token shards (the pretrain stage's tokens/ folder)."""
    from chatforge.dataloader import PackedLoader, TokenStream, read_index

    tokens_dir = stage_dir(cfg, "pretrain") / "tokens"
    index = read_index(tokens_dir)
    if index is None:
        raise ChatforgeError(f"--replay needs the pretraining token shards of run '{cfg.run}' ({tokens_dir}); "
                             f"run `chatforge pretrain --run {cfg.run}` or pass --replay 0")
    if index["vocab_size"] != tok.vocab_size:
        raise ChatforgeError(f"{tokens_dir} was tokenized with {index['vocab_size']} tokens, the checkpoint's "
                             f"tokenizer has {tok.vocab_size}; replay needs the same tokenizer")
    return PackedLoader(TokenStream(tokens_dir, index, "train"), rows, seq_len, rank=d.rank, world_size=d.world,
                        grad_accum=cfg.grad_accum, seed=cfg.seed, device=device)


def chat_samples(model, tok, prompts: list[str], device, lora: bool = False, max_tokens: int = 48) -> list[str]:
    """Greedy replies to single-turn prompts through the engine (tools off), 'prompt -> reply'."""
    from chatforge.engine import Engine
    from chatforge.lora import merge_lora

    m = merge_lora(copy.deepcopy(model)) if lora else model  # the engine reads plain Linear weights
    was = m.training
    m.eval()
    engine = Engine(m, tok, tools={}, device=device)
    comps = engine.generate([tok.render_prompt([{"role": "user", "content": p}]) for p in prompts],
                            max_tokens=max_tokens, temperature=0.0, use_tools=False)
    m.train(was)
    return [f"{p} -> {c.text}" for p, c in zip(prompts, comps)]


# ----------------------------------------------------------------------------------------------
# Measurements


def _bpb(cfg, model, tok, seq_len, amp_dtype) -> dict:
    """Bits per byte on the pretraining validation text (the forgetting measurement), at the source's
    context (the SFT model scores the same windows as the base model)."""
    from chatforge.evaluate import run_bpb

    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    tokens_dir = stage_dir(cfg, "pretrain") / "tokens"
    r = run_bpb(model, tok, tokens_dir=tokens_dir if tokens_dir.exists() else None, max_tokens=cfg.bpb_tokens,
                batch_size=cfg.device_batch_size, autocast=autocast)
    return {"bpb": r["bpb"], "bpb_tokens": r["tokens"]} if r.get("status") == "ok" else {"bpb_missing": r.get("reason")}


def _facts(cfg):
    from chatforge.tasks.probing import read_facts

    f = stage_dir(cfg, "facts") / "facts.jsonl"
    return read_facts(f) if f.exists() else None


def _measure_base(cfg, model, tok, device, seq_len, amp_dtype) -> dict:
    from chatforge.engine import Engine
    from chatforge.tasks.probing import engine_sampler, entity_probe_rates

    out = _bpb(cfg, model, tok, seq_len, amp_dtype)
    facts = _facts(cfg)
    if facts:
        sampler = engine_sampler(Engine(model, tok, tools={}, device=device), chat=False, max_tokens=16,
                                 temperature=0.0)
        out["probe"] = entity_probe_rates(sampler, *facts)
    return out


def _measure_chat(cfg, model, tok, device, seq_len, amp_dtype) -> dict:
    from chatforge.engine import Engine
    from chatforge.evaluate import _eval_tools
    from chatforge.tasks import chat_checks as K
    from chatforge.tasks.identity import IdentityCard
    from chatforge.tasks.probing import engine_sampler, entity_probe_rates

    engine = Engine(model, tok, tools=_eval_tools(10.0), device=device)
    card = IdentityCard(name=cfg.identity_name, maker=cfg.identity_maker)
    n = cfg.check_n
    prompts = _held_out_prompts(cfg, n)
    out = {"well_formed": K.well_formed_rate(engine, prompts), "identity": K.identity_rates(engine, card, data_dir=cfg.data_dir)}
    for kind in ("letter_count", "arithmetic"):
        out[kind] = K.tool_task_rates(engine, kind, n)
    facts = _facts(cfg)
    if facts:
        sampler = engine_sampler(Engine(model, tok, tools={}, device=device), chat=True, max_tokens=32, temperature=0.0)
        out["probe"] = entity_probe_rates(sampler, *facts)
    out.update(_bpb(cfg, model, tok, seq_len, amp_dtype))
    return out


def _held_out_prompts(cfg, n: int) -> list[list[dict]]:
    """First user turns of held-out conversations of every kind (val splits), n in all."""
    from chatforge.tasks import conversations as C
    from chatforge.tasks.identity import IdentityCard, identity_conversations
    from chatforge.tasks.synthetic import synthetic_conversations

    pools = []
    for make in (lambda: C.oasst_conversations(data_dir=cfg.data_dir, split="val"),
                 lambda: C.self_instruct_conversations(data_dir=cfg.data_dir, split="val"),
                 lambda: identity_conversations(IdentityCard(cfg.identity_name, cfg.identity_maker), n, "val", cfg.seed,
                                                cfg.data_dir),
                 lambda: synthetic_conversations(("spelling", "reverse", "decimal_compare"), n, "val", cfg.seed)):
        try:
            convs = list(make())
        except ChatforgeError:
            continue
        pools.append([c[:next(i for i, m in enumerate(c) if m["role"] == "user") + 1] for c in convs])
    out, i = [], 0
    while len(out) < n and any(i < len(p) for p in pools):
        out += [p[i] for p in pools if i < len(p)]
        i += 1
    return out[:n]


def write_forgetting(out: Path, cells: list[dict]) -> dict:
    """forgetting.json and forgetting.md: val bpb on pretraining text before/after, per cell."""
    table = {c["name"]: {k: c.get(k) for k in ("lora", "replay", "steps", "trainable_fraction", "val_loss",
                                               "bpb_before", "bpb_after", "train_seconds")} for c in cells}
    write_json(out / "forgetting.json", table)
    lines = ["| cell | trainable | steps | SFT val loss | bpb before | bpb after | change |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in table.items():
        b, a = c["bpb_before"], c["bpb_after"]
        ch = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"| {name} | {c['trainable_fraction']:.2%} | {c['steps']} | {c['val_loss'] or float('nan'):.4f} | "
                     f"{b if b is not None else float('nan'):.4f} | {a if a is not None else float('nan'):.4f} | {ch} |")
    (out / "forgetting.md").write_text("\n".join(lines) + "\n")
    return table


def report_lines(s: dict) -> str:
    """The summary for the terminal."""
    lines = [f"sft done: {s['steps']} steps, val loss {s.get('val_loss') or float('nan'):.4f}, trainable "
             f"{s['trainable_params']:,} of {s['total_params']:,} params ({s['trainable_fraction']:.2%}); "
             f"checkpoint {s['checkpoint']}"]
    a, b = s.get("after"), s.get("before")
    if a:
        lines.append(f"  well-formed {a['well_formed']['well_formed_rate']:.0%}; identity name+maker "
                     f"{a['identity']['name_and_maker_rate']:.0%}; letter count call/correct "
                     f"{a['letter_count']['python_call_rate']:.0%}/{a['letter_count']['correct_rate']:.0%}; arithmetic "
                     f"{a['arithmetic']['python_call_rate']:.0%}/{a['arithmetic']['correct_rate']:.0%}")
        if "probe" in a:
            p0 = (b or {}).get("probe", {})
            lines.append(f"  probe known correct {p0.get('known_correct_rate', float('nan')):.0%} -> "
                         f"{a['probe']['known_correct_rate']:.0%}; unknown refused "
                         f"{p0.get('unknown_refusal_rate', float('nan')):.0%} -> {a['probe']['unknown_refusal_rate']:.0%}")
        if "bpb" in a and b and "bpb" in b:
            lines.append(f"  pretraining val bpb {b['bpb']:.4f} -> {a['bpb']:.4f}")
    return "\n".join(lines)

