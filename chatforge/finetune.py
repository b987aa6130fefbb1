"""Pieces of supervised fine-tuning that sit between the loss functions and the training loop.

    model = extend_context(model, 512)                  # longer RoPE tables than pretraining used
    opt = sft_optimizer(model, lora=..., ...)           # Muon + AdamW (full) or AdamW on the adapters
    trainer = Trainer(prepared, opt, sft_loss, loader, ...,
                      checkpointer=AdapterCheckpointer(...) if lora else Checkpointer(...))
    val = held_out_loss(model, val_rows, batch_size, seq_len, device)

`sft_loss` is the assistant-only loss: the per-token negative log-likelihood of the tokens whose
target is not -1 (chatforge.tasks.mixture renders prompts, tool output and padding as -1), through
chatforge.losses (get_response_log_probs + sft_microbatch_train_step, per-token normalisation). The
training loop (chatforge/train_loop.py) does the backward pass, accumulation and clipping.

LoRA checkpoints: `AdapterCheckpointer` writes the *merged* weights (W + (alpha/r) B A, plain GPT
names: loadable by `chatforge chat`, the engine, the export) and the adapters themselves
(lora_adapters.safetensors) in the same atomic swap, so a resume rebuilds exactly the training state:
source weights + the same adapters + the optimizer state.

The SFT stage's steps, each a function the stage (chatforge/stages/sft.py) calls in order:

    probe_source       knowledge probing of the source model on the facts stage's questions
    build_data         the conversation mixture (train rows) and held-out rows, counted per source
    train_cell         one fine-tuning run ({full, LoRA} x {replay on, off}) through the training loop
    measure_base / measure_chat   the checks before and after (probe, identity, tool use, bpb)
    write_forgetting   the forgetting table of the grid
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch

from chatforge.common import ChatforgeError, is_complete, log0, stage_dir, write_json
from chatforge.losses import get_response_log_probs, sft_microbatch_train_step
from chatforge.model import rope_tables
from chatforge.train_loop import Checkpointer, torch_optimizers

ADAPTER_FILE = "lora_adapters.safetensors"


def sft_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean NLL over the trained targets of one micro-batch (x, y[, doc_ids]), both (B, T), -1 = no loss.
    Returns (loss, {"n_tokens": positions processed, "trained_tokens": targets trained})."""
    x, y = batch[0], batch[1]  # (B, T), (B, T)
    mask = y >= 0  # (B, T)
    log_probs = get_response_log_probs(model, x, y)["log_probs"]  # (B, T)
    loss, meta = sft_microbatch_train_step(log_probs, mask, gradient_accumulation_steps=1, backward=False)
    return loss, {"n_tokens": float(x.numel()), "trained_tokens": float(meta["response_tokens"])}


@torch.no_grad()
def held_out_loss(model, batches, autocast=None) -> dict:
    """Per-token NLL over held-out (x, y) batches (e.g. iter_conversation_batches): the sum of every
    trained target's loss / their count. Returns {"val_loss", "val_tokens"}."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast():
            total += float(model(x, y, loss_reduction="sum"))
        count += int((y >= 0).sum())
    model.train(was)
    if count == 0:
        raise ChatforgeError("no held-out conversation has a trained token; add validation data")
    return {"val_loss": total / count, "val_tokens": count}


def extend_context(model, max_seq_len: int):
    """Let the model take sequences of max_seq_len tokens: RoPE positions are computed, not learned,
    so longer tables are the same function extended (rope_tables). Fine-tuning at the longer length
    then teaches the model to use the new positions. A shorter length is an error (it would silently
    cut what the checkpoint handles)."""
    cfg = model.config
    if max_seq_len < cfg.max_seq_len:
        raise ChatforgeError(f"--max_seq_len {max_seq_len} is shorter than the checkpoint's context "
                             f"{cfg.max_seq_len}; use 0 (keep it) or a longer one")
    if max_seq_len > cfg.max_seq_len:
        cfg.max_seq_len = max_seq_len
        model.cos, model.sin = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_theta, model.wte.weight.device)
    return model


def sft_optimizer(model, *, lora: bool, lr_frac: float, matrix_lr: float, embedding_lr: float,
                  unembedding_lr: float, scalar_lr: float, lora_lr: float, fused: bool | None = None):
    """Full fine-tuning: the pretraining optimizers (Muon on the block matrices, AdamW elsewhere) at
    lr_frac of the pretraining rates (nanochat's SFT starts at a fraction of them). LoRA: AdamW on the
    adapter matrices only (model.param_groups() would put them in Muon's group; the frozen weights
    must get no optimizer state at all)."""
    from chatforge.lora import lora_parameters
    from chatforge.optim import build_optimizer

    if lora:
        params = lora_parameters(model)
        if not params:
            raise ChatforgeError("LoRA requested but the model has no adapters (apply_lora first)")
        return torch.optim.AdamW([{"params": params, "lr": lora_lr, "initial_lr": lora_lr, "kind": "lora"}],
                                 lr=lora_lr, betas=(0.9, 0.999), weight_decay=0.0, fused=fused)
    return build_optimizer(model.param_groups(), model.config.n_embd, matrix_lr=matrix_lr * lr_frac,
                           embedding_lr=embedding_lr * lr_frac, unembedding_lr=unembedding_lr * lr_frac,
                           scalar_lr=scalar_lr * lr_frac, fused=fused)


class _Weights:
    """What save_checkpoint needs from a model (config + state_dict), for the merged LoRA weights."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state


class AdapterCheckpointer(Checkpointer):
    """A Checkpointer for LoRA runs: merged weights as the checkpoint's model (a plain GPT), the
    adapters in ADAPTER_FILE, optimizer and train state as usual (see the module docstring)."""

    def save(self, trainer) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from chatforge.checkpoint import save_checkpoint
        from chatforge.distributed import barrier
        from chatforge.lora import lora_state_dict, merged_state_dict
        from chatforge.rng import rng_state

        if trainer.model.sharded:
            raise ChatforgeError("LoRA with --fsdp is not supported: the adapters are small, use DDP (drop --fsdp)")
        raw = trainer.model.module
        opt_sd = get_optimizer_state_dict(raw, torch_optimizers(trainer.optimizer),
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.dist.master:
            t0 = time.time()
            s = trainer.state
            if hasattr(trainer.batches, "state_dict"):
                s.data = trainer.batches.state_dict()
            train_state = {**s.state_dict(), "rng": rng_state(trainer.device), "world_size": trainer.dist.world,
                           "num_steps": trainer.config.num_steps, **self.extra_state}
            save_checkpoint(self.path, _Weights(raw.config, merged_state_dict(raw)), tokenizer_dir=self.tokenizer_dir,
                            optimizer_state=opt_sd, train_state=train_state, meta={**self.meta, "step": s.step, **s.metrics},
                            extra_tensors={ADAPTER_FILE: lora_state_dict(raw)})
            trainer.log(event="checkpoint", step=s.step, seconds=round(time.time() - t0, 3))
        barrier(trainer.dist)


def load_adapters(model, checkpoint_dir) -> None:
    """Load a LoRA run's adapters (ADAPTER_FILE of its checkpoint) into a model with the same
    adapters applied; a missing file is an error naming it."""
    from pathlib import Path

    from safetensors.torch import load_file

    from chatforge.lora import load_lora_state_dict

    f = Path(checkpoint_dir) / ADAPTER_FILE
    if not f.is_file():
        raise ChatforgeError(f"{f} is missing: the checkpoint is not from a LoRA run with these settings; "
                             f"pass --force to start over")
    load_lora_state_dict(model, load_file(f))


# ----------------------------------------------------------------------------------------------
# Data


def probe_source(cfg, model, tok, device, out: Path) -> dict | None:
    """Sample the source model (as a base model: probing.completion_prompt) k times on the questions about
    the facts stage's people of the SFT split; label each question known/unknown; save the results."""
    from chatforge.engine import Engine
    from chatforge.tasks.probing import completion_prompt, engine_sampler, entity_questions, entity_split, probe, \
        read_facts, save_probe_results

    facts_dir = stage_dir(cfg, "facts")
    if not is_complete(facts_dir):
        log0(f"sft: no facts stage in run '{cfg.run}' ({facts_dir}): no probing conversations "
             f"(run `chatforge facts --run {cfg.run}` before pretraining, or pass --probe false)")
        return None
    known, unknown = read_facts(facts_dir / "facts.jsonl")
    people = [e for e in known + unknown if entity_split(e) == "train"]
    questions = [q for e in people for q in entity_questions(e)]
    engine = Engine(model, tok, tools={}, device=device)
    sampler = engine_sampler(engine, chat=False, max_tokens=16, temperature=cfg.probe_temperature, seed=cfg.seed)
    results = probe(questions, sampler, k=cfg.probe_k, threshold=cfg.probe_threshold, ask=completion_prompt)
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
            out.append(Source("probe", probe_conversations(probe_out["results"], cfg.seed), cfg.probe_weight))
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


def cell_name(lora: bool, replay: float) -> str:
    return f"{'lora' if lora else 'full'}{f'+replay{replay:g}' if replay > 0 else ''}"


def grid_cells(lora: bool, replay: float) -> list[tuple[bool, float]]:
    share = replay if replay > 0 else 0.25
    return [(lo, r) for lo in (False, True) for r in (0.0, share) if (lo, r) != (lora, replay)]


def train_cell(cfg, d, device, out, src, base, info, tok, seq_len, rows, val_rows, *, lora: bool, replay: float,
               num_steps: int, resume: bool, log, checkpoint: bool, amp_dtype, sample_prompts=()):
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
                                seed=cfg.seed, device=device, group_by_length=True)
    batches = loader
    if n_replay:
        batches = ReplayLoader(loader, replay_loader(cfg, tok, n_replay, seq_len, d, device))
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
    name = cell_name(lora, replay)
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
        return chat_samples(model, tok, list(sample_prompts), device, lora)

    warmdown = round(cfg.warmdown_ratio * steps)
    trainer = Trainer(prepared, opt, sft_loss, batches,
                      LoopConfig(num_steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                 eval_every=cfg.eval_every, sample_every=cfg.sample_every,
                                 checkpoint_every=cfg.checkpoint_every if checkpoint else 0, best_metric="val_loss",
                                 name=f"sft {name}", diverge_hint="lower --lr_frac / --lora_lr, or check the data"),
                      dist=d, device=device, amp_dtype=amp_dtype, evaluate=evaluate,
                      sample=sample if log is not None and sample_prompts else None, checkpointer=ck, log=log,
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


def replay_loader(cfg, tok, rows: int, seq_len: int, d, device):
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


def pretraining_bpb(cfg, model, tok, seq_len, amp_dtype) -> dict:
    """Bits per byte on the pretraining validation text (the forgetting measurement), at the source's
    context (the SFT model scores the same windows as the base model)."""
    from chatforge.evaluate import run_bpb

    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    tokens_dir = stage_dir(cfg, "pretrain") / "tokens"
    r = run_bpb(model, tok, tokens_dir=tokens_dir if tokens_dir.exists() else None, max_tokens=cfg.bpb_tokens,
                batch_size=cfg.device_batch_size, autocast=autocast)
    return {"bpb": r["bpb"], "bpb_tokens": r["tokens"]} if r.get("status") == "ok" else {"bpb_missing": r.get("reason")}


def read_run_facts(cfg):
    from chatforge.tasks.probing import read_facts

    f = stage_dir(cfg, "facts") / "facts.jsonl"
    return read_facts(f) if f.exists() else None


def measure_base(cfg, model, tok, device, seq_len, amp_dtype) -> dict:
    from chatforge.engine import Engine
    from chatforge.tasks.probing import completion_prompt, engine_sampler, entity_probe_rates

    out = pretraining_bpb(cfg, model, tok, seq_len, amp_dtype)
    facts = read_run_facts(cfg)
    if facts:
        sampler = engine_sampler(Engine(model, tok, tools={}, device=device), chat=False, max_tokens=16,
                                 temperature=0.0)
        out["probe"] = entity_probe_rates(sampler, *facts, ask=completion_prompt)
    return out


def measure_chat(cfg, model, tok, device, seq_len, amp_dtype) -> dict:
    from chatforge.config import ChatConfig
    from chatforge.engine import Engine
    from chatforge.evaluate import _eval_tools
    from chatforge.tasks import chat_checks as K
    from chatforge.tasks.identity import IdentityCard
    from chatforge.tasks.probing import engine_sampler, entity_probe_rates

    engine = Engine(model, tok, tools=_eval_tools(10.0), device=device)
    card = IdentityCard(name=cfg.identity_name, maker=cfg.identity_maker)
    n = cfg.check_n
    prompts = held_out_prompts(cfg, n)
    # Well-formed as `chatforge chat` samples replies by default (its ChatConfig), and greedy: greedy
    # decoding of a small model falls into loops that sampling leaves (bench/RESULTS.md, "SFT").
    chat = ChatConfig()
    out = {"well_formed": K.well_formed_rate(engine, prompts, temperature=chat.temperature, top_k=chat.top_k,
                                             top_p=chat.top_p),
           "well_formed_greedy": K.well_formed_rate(engine, prompts),
           "identity": K.identity_rates(engine, card, data_dir=cfg.data_dir)}
    for kind in ("letter_count", "arithmetic"):
        out[kind] = K.tool_task_rates(engine, kind, n)
    facts = read_run_facts(cfg)
    if facts:
        sampler = engine_sampler(Engine(model, tok, tools={}, device=device), chat=True, max_tokens=32, temperature=0.0)
        out["probe"] = entity_probe_rates(sampler, *facts)
    out.update(pretraining_bpb(cfg, model, tok, seq_len, amp_dtype))
    return out


def held_out_prompts(cfg, n: int) -> list[list[dict]]:
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
