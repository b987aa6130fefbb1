"""One training loop for every stage that updates weights: pretraining now, SFT, RL and RLHF next.

A stage brings what is its own -- the model, the optimizer and its schedule, a batch source and a
loss function -- and the loop does the rest the same way for all of them:

    setup      prepare_model: DDP replicas or FSDP2 shards under torchrun, torch.compile (with an
               eager fallback when the compiler fails)
    step       grad_accum micro-batches, each `loss_fn(model, batch) -> (loss, metrics)`; the
               gradient sync (DDP all-reduce, FSDP reduce-scatter) only on the last micro-step;
               global-norm clipping; a NaN/inf loss or gradient stops before the update
    periodic   evaluate / sample / checkpoint every N steps and at the end
    stop       SIGINT / SIGTERM: finish the step, checkpoint, exit (a second Ctrl-C aborts)
    resume     weights, optimizer state, step, data position and RNG states, so a resumed run
               reproduces the uninterrupted one (bit for bit in eager mode on CPU, tested)
    log        one metrics.jsonl record per step (loss, lr, grad norm, tokens/s, MFU where the
               device's peak is known) and a tqdm progress bar

A stage, in full (pretraining is chatforge/stages/pretrain.py):

    d = dist_from_env(); device = init_distributed(d, get_device("auto"))
    model, info = load_checkpoint(path) if resuming else (GPT(config), None)
    prepared = prepare_model(model.to(device), d, device, fsdp=False, compile=False)
    opt = build_optimizer(prepared.module.param_groups(), width)          # after FSDP sharding
    trainer = Trainer(prepared, opt, loss_fn, batches, LoopConfig(num_steps=1000, grad_accum=4),
                      dist=d, device=device, lr_schedule=lambda step: ...,
                      evaluate=lambda t: {"val_loss": ...}, checkpointer=Checkpointer(out / "checkpoint"),
                      log=run.log)
    if info: trainer.resume(info)
    state = trainer.run()

`loss_fn(model, batch)` gets the module to call for training (DDP- and compile-wrapped) and one
micro-batch as the batch source returned it; it returns the mean loss of that micro-batch, or
(loss, {"name": value, ...}) whose values are averaged over micro-steps and ranks and logged with
the step (a value named `n_tokens` is summed instead and used for tokens/s; every rank and micro-step
must report the same names). The step's gradient is
the mean of the micro-batch losses' gradients. A batch source is anything with `next_batch()`; with
`state_dict()` / `load_state_dict()` too, its position is saved and resumed exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from chatforge.common import ChatforgeError, log0
from chatforge.distributed import Dist, all_reduce_sum, barrier
from chatforge.hardware import device_peak_flops
from chatforge.optim import clip_grad_norm
from chatforge.rng import rng_state, set_rng_state


class BatchSource(Protocol):
    """Where micro-batches come from. `state_dict`/`load_state_dict` are optional: without them a
    resumed run starts the source afresh."""

    def next_batch(self) -> Any: ...


class NonFiniteLoss(ChatforgeError):
    """The loss or the gradient norm became nan/inf; raised before the update is applied."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was written (the CLI exits with 130)."""


# ----------------------------------------------------------------------------------------------
# State and settings


@dataclass
class TrainState:
    """What the loop knows about its progress; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all ranks
    train_time: float = 0.0  # seconds inside optimizer steps (evaluation, sampling, saving excluded)
    smooth_loss: float = 0.0  # EMA (0.9) of the step loss, not bias-corrected
    last_loss: float | None = None  # the last step's loss
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's results
    best: float | None = None  # best value of LoopConfig.best_metric so far
    last_eval_step: int = -1  # a resumed run does not repeat an evaluation / samples made at its step
    last_sample_step: int = -1
    data: dict | None = None  # the batch source's state_dict at the last checkpoint

    @property
    def debiased_loss(self) -> float:
        """The smoothed loss with the EMA's start-up bias removed (Adam's correction)."""
        return self.smooth_loss / (1 - 0.9 ** self.step) if self.step else float("nan")

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """Read state.json's values; also reads the names of checkpoints written before the loop
        existed (tokens_seen, loader, val_bpb, min_val_bpb)."""
        legacy = {"tokens": d.get("tokens_seen"), "data": d.get("loader"), "best": d.get("min_val_bpb"),
                  "metrics": {"val_bpb": d["val_bpb"]} if d.get("val_bpb") is not None else None}
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in legacy.items() if v is not None and k not in d}
        values.update({k: v for k, v in d.items() if k in names})
        return cls(**values)


@dataclass
class LoopConfig:
    """Settings of the loop itself (a stage builds this from its own config)."""

    num_steps: int  # optimizer steps to reach (a resumed run continues to the same number)
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    tokens_per_step: int = 0  # for tokens/s when loss_fn reports no `n_tokens` (all ranks)
    flops_per_token: int = 0  # training FLOPs per token, for MFU (0 = no MFU)
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    sample_every: int = 0  # steps between samples (0 = only at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end and on a stop)
    best_metric: str = ""  # evaluation result whose best value TrainState.best keeps
    best_higher: bool = False  # higher is better for best_metric (a reward, an accuracy); else lower (a loss)
    name: str = "train"  # the progress bar's label
    diverge_hint: str = "lower the learning rate or raise the warmup, or check the data"


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class PreparedModel:
    """A model ready to train: `module` is the model itself (sharded in place under FSDP), used to
    save, evaluate and sample; `train` is what a training forward calls (DDP wrapper and/or
    torch.compile around it); `eager` is `train` without compile (the fallback)."""

    module: torch.nn.Module
    train: torch.nn.Module
    eager: torch.nn.Module
    sharded: bool = False  # FSDP: every rank must take part in any forward, sampling included


def prepare_model(model: torch.nn.Module, d: Dist, device: torch.device, *, fsdp: bool = False,
                  compile: bool = False, say: Callable[[str], None] = log0) -> PreparedModel:
    """Wrap a model (already on `device`) for data parallel training: FSDP2 `fully_shard` per block
    and at the root when `fsdp`, else DDP replicas, on more than one process; then torch.compile
    when asked. Build the optimizer from `prepared.module` afterwards (FSDP swaps in DTensors)."""
    train = model
    sharded = False
    if fsdp and d.enabled:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        sharded = True
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eager = train
    if compile:
        # Inductor fuses the elementwise work (norms, RoPE, SwiGLU) around the matmuls; on CPU it
        # generates C++ and needs a compiler.
        if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            say("note: --compile on CPU needs a C++ compiler (g++ or $CXX); none found, running eagerly")
        else:
            train = torch.compile(train)
    return PreparedModel(module=model, train=train, eager=eager, sharded=sharded)


def _is_compile_error(e: Exception) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(e).lower()


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` (a chatforge MultiOptimizer or a torch optimizer)."""
    inner = getattr(optimizer, "optimizers", None)
    return list(inner.values()) if isinstance(inner, dict) else [optimizer]


def set_lr(optimizer, multiplier: float) -> None:
    """lr = initial_lr x multiplier in every param group (initial_lr: the rate it was built with)."""
    for opt in torch_optimizers(optimizer):
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g["lr"] = g["initial_lr"] * multiplier


# ----------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: finish the step, checkpoint, exit.


class StopFlag:
    """`with StopFlag() as stop:` turns SIGINT/SIGTERM into `stop.requested = True`; a second Ctrl-C
    raises KeyboardInterrupt at once. The old handlers come back on exit."""

    def __init__(self, say: Callable[[str], None] = log0):
        self.requested = False
        self.say = say
        self._old: dict = {}

    def __enter__(self) -> "StopFlag":
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop right now
                raise KeyboardInterrupt
            self.requested = True
            self.say(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                     "(Ctrl-C again to abort without saving)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


# ----------------------------------------------------------------------------------------------
# Checkpoints


class _FullWeights:
    """What `save_checkpoint` needs from a model (config + state_dict), for weights gathered from
    FSDP shards."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state


class Checkpointer:
    """Saves the trainer's model, optimizer and state as a chatforge checkpoint folder
    (chatforge/checkpoint.py: atomic replace, so a crash keeps the previous one).

    `meta` goes into config.json (e.g. {"stage": "sft", "run": ...}; the step and the last evaluation
    results are added); `extra_state` into state.json next to the TrainState (values a stage checks
    on resume, e.g. the batch size); `tokenizer_dir` is copied in so the checkpoint stands alone."""

    def __init__(self, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                 meta: dict | None = None, extra_state: dict | None = None):
        self.path = Path(path)
        self.tokenizer_dir, self.meta, self.extra_state = tokenizer_dir, dict(meta or {}), dict(extra_state or {})

    def exists(self) -> bool:
        return self.path.exists()

    def saved_step(self):
        """The step of the checkpoint on disk, '?' when unreadable (for messages)."""
        from chatforge.checkpoint import read_config

        try:
            return read_config(self.path).get("step", "?")
        except (ChatforgeError, OSError):
            return "?"

    def payload(self, model) -> tuple[Any, dict | None]:
        """(what save_checkpoint writes as the model, {file: tensors} written beside it). A model that is
        more than a GPT overrides this: the reward model saves its backbone as the checkpoint's model and
        its scalar head in a file of its own (chatforge/reward_model.py)."""
        return model, None

    def save(self, trainer: "Trainer") -> None:
        """Gather (every rank: FSDP collectives) and write (rank 0) a checkpoint of `trainer`."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        from chatforge.checkpoint import save_checkpoint

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        raw = trainer.model.module
        model_sd = get_model_state_dict(raw, options=options) if trainer.model.sharded else None
        opt_sd = get_optimizer_state_dict(raw, torch_optimizers(trainer.optimizer), options=options)
        if trainer.dist.master:
            t0 = time.time()
            s = trainer.state
            if hasattr(trainer.batches, "state_dict"):
                s.data = trainer.batches.state_dict()
            weights = _FullWeights(raw.config, model_sd) if model_sd is not None else raw
            weights, extra = self.payload(weights)
            train_state = {**s.state_dict(), "rng": rng_state(trainer.device), "world_size": trainer.dist.world,
                           "num_steps": trainer.config.num_steps, **self.extra_state}
            save_checkpoint(self.path, weights, tokenizer_dir=self.tokenizer_dir, optimizer_state=opt_sd,
                            train_state=train_state, meta={**self.meta, "step": s.step, **s.metrics},
                            extra_tensors=extra)
            trainer.log(event="checkpoint", step=s.step, seconds=round(time.time() - t0, 3))
        barrier(trainer.dist)


# ----------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """The training loop (see the module docstring). Callbacks get the trainer:

        evaluate(trainer) -> {"metric": value, ...}   logged as an "eval" event; print with trainer.write
        sample(trainer) -> [text, ...]                 logged as a "samples" event and printed
        lr_schedule(step) -> multiplier                lr = initial lr x multiplier, before step `step` (0-based)
        on_step(step)                                  anything else per step (e.g. Muon's momentum ramp)

    `run()` trains to config.num_steps with the periodic work and the stop flag; `train_step()` is
    one optimizer step on its own (benchmarks, custom loops)."""

    def __init__(self, model: PreparedModel | torch.nn.Module, optimizer, loss_fn: Callable, batches: BatchSource,
                 config: LoopConfig, *, dist: Dist | None = None, device=None, amp_dtype: torch.dtype | None = None,
                 lr_schedule: Callable[[int], float] | None = None, on_step: Callable[[int], None] | None = None,
                 evaluate: Callable[["Trainer"], dict] | None = None,
                 sample: Callable[["Trainer"], list[str]] | None = None,
                 checkpointer: Checkpointer | None = None, log: Callable[..., None] | None = None,
                 say: Callable[[str], None] = log0, peak_flops: float | None = None):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # wrapped by the caller
            model = PreparedModel(module=model.module, train=model, eager=model)
        elif not isinstance(model, PreparedModel):
            model = PreparedModel(module=model, train=model, eager=model,
                                  sharded=hasattr(model, "set_requires_gradient_sync"))  # FSDP2 fully_shard
        if config.grad_accum < 1 or config.num_steps < 0:
            raise ValueError(f"grad_accum must be >= 1 and num_steps >= 0, got {config}")
        self.model, self.optimizer, self.loss_fn, self.batches, self.config = model, optimizer, loss_fn, batches, config
        self.dist = dist or Dist()
        self.device = torch.device(device) if device is not None else next(model.module.parameters()).device
        self.amp_dtype = amp_dtype
        self.lr_schedule, self.on_step = lr_schedule, on_step
        self.evaluate_fn, self.sample_fn, self.checkpointer = evaluate, sample, checkpointer
        self._log = log if (log is not None and self.dist.master) else None
        self.say = say
        self.peak_flops = peak_flops if peak_flops is not None else device_peak_flops(self.device)
        self.state = TrainState()
        self.stop: StopFlag | None = None
        self._bar = None
        self._fsdp_sync = self.model.sharded and hasattr(self.model.module, "set_requires_gradient_sync")

    # -- small services for callbacks --

    def autocast(self):
        """The compute-dtype context (bf16 autocast on CUDA; a no-op in float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def log(self, **record) -> None:
        """Append a record to metrics.jsonl (rank 0; a no-op without a log)."""
        if self._log is not None:
            self._log(**record)

    def write(self, text: str) -> None:
        """Print a line above the progress bar (rank 0)."""
        if not self.dist.master:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            self.say(text)

    # -- resume --

    def resume(self, info: dict) -> None:
        """Continue from a checkpoint: `info` is what chatforge.checkpoint.load_checkpoint returned
        for it (whose weights the model already holds). Restores the optimizer state, the TrainState,
        the batch source's position and the RNG states."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from chatforge.checkpoint import load_optimizer_state

        path, train_state = Path(info["path"]), info.get("train_state")
        opt_state = load_optimizer_state(path)
        if opt_state is None or not train_state:
            raise ChatforgeError(f"checkpoint {path} has no optimizer/trainer state to resume from; "
                                 f"pass --force to start over")
        set_optimizer_state_dict(self.model.module, torch_optimizers(self.optimizer), opt_state,
                                 options=StateDictOptions(full_state_dict=True))
        self.state = TrainState.from_dict(train_state)
        if self.state.data is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(self.state.data)
        if "rng" in train_state:
            set_rng_state(train_state["rng"], self.device)
        self.say(f"resumed from {path} at step {self.state.step:,}")

    # -- one optimizer step --

    def _forward(self, batch):
        try:
            out = self.loss_fn(self.model.train, batch)
        except Exception as e:  # a compiler failure (first call): train eagerly instead
            if self.model.train is self.model.eager or not _is_compile_error(e):
                raise
            self.say(f"note: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            self.model.train = self.model.eager
            out = self.loss_fn(self.model.train, batch)
        return out if isinstance(out, tuple) else (out, {})

    def train_step(self) -> dict:
        """One optimizer step: grad_accum micro-batches, clip, update. Returns the step's record
        (also logged). Raises NonFiniteLoss, without updating, on a nan/inf loss or gradient."""
        cfg, d, device, s = self.config, self.dist, self.device, self.state
        t0 = time.time()
        lrm = None
        if self.lr_schedule is not None:
            lrm = self.lr_schedule(s.step)
            if hasattr(self.optimizer, "set_lr"):
                self.optimizer.set_lr(lrm)
            else:
                set_lr(self.optimizer, lrm)
        if self.on_step is not None:
            self.on_step(s.step)
        loss_sum = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}
        ddp = isinstance(self.model.eager, torch.nn.parallel.DistributedDataParallel)
        for micro in range(cfg.grad_accum):
            batch = self.batches.next_batch()
            sync = micro == cfg.grad_accum - 1
            # Gradients are reduced across ranks once per step, on its last micro-batch.
            ctx = self.model.eager.no_sync() if ddp and not sync else contextlib.nullcontext()
            if self._fsdp_sync:
                self.model.module.set_requires_gradient_sync(sync)
            with ctx:
                with self.autocast():
                    loss, metrics = self._forward(batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                sums[k] = sums[k] + v if k in sums else v
        # One small all-reduce carries the loss (for logging and the NaN check), the stop flag and
        # the loss function's metrics, so every rank agrees on all of them.
        keys = sorted(sums)
        requested = float(self.stop.requested) if self.stop is not None else 0.0
        flags = all_reduce_sum(torch.stack([loss_sum / cfg.grad_accum, torch.tensor(requested, device=device),
                                            *(sums[k].reshape(()) for k in keys)]), d)
        step_loss = float(flags[0]) / d.world
        stop_now = float(flags[1]) > 0
        extra = {k: float(flags[2 + i]) if k == "n_tokens" else float(flags[2 + i]) / (d.world * cfg.grad_accum)
                 for i, k in enumerate(keys)}
        gnorm = clip_grad_norm(self.model.module.parameters(), cfg.grad_clip)
        if not math.isfinite(step_loss) or not math.isfinite(gnorm):
            self._diverged(step_loss, gnorm, lrm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.time() - t0
        step_tokens = int(extra["n_tokens"]) if "n_tokens" in extra else cfg.tokens_per_step
        s.step += 1
        s.train_time += dt
        s.tokens += step_tokens
        s.last_loss = step_loss
        s.smooth_loss = 0.9 * s.smooth_loss + 0.1 * step_loss
        tps = step_tokens / dt
        rec = dict(step=s.step, loss=step_loss, smooth_loss=s.debiased_loss)
        if lrm is not None:
            rec["lr_mult"] = lrm
        rec.update(lr=self.optimizer.param_groups[0]["lr"], grad_norm=gnorm, tokens=s.tokens, tokens_per_s=tps,
                   dt=dt)
        if self.peak_flops and cfg.flops_per_token:
            rec["mfu"] = cfg.flops_per_token * tps / (self.peak_flops * d.world)
        rec.update(extra)
        self.log(**rec)
        rec["stop"] = stop_now
        return rec

    def _diverged(self, loss: float, gnorm: float, lrm: float | None):
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
        at = self.state.step + 1
        ck = self.checkpointer
        kept = (f"the last good checkpoint is kept at {ck.path} (step {ck.saved_step()})" if ck and ck.exists()
                else "no checkpoint was written yet")
        self.log(event="nonfinite", step=at, what=what, value=str(value))
        lr = f" (lr multiplier {lrm:.3g})" if lrm is not None else ""
        raise NonFiniteLoss(f"training diverged: the {what} is {value} at step {at}{lr}; stopped before "
                            f"applying the update, {kept}. {self.config.diverge_hint[:1].upper()}"
                            f"{self.config.diverge_hint[1:]}; rerunning continues from the checkpoint")

    # -- periodic work --

    def _due(self, every: int, last: bool) -> bool:
        return last or (every > 0 and self.state.step % every == 0)

    def _periodic(self, start_step: int, last: bool) -> None:
        cfg, s, d = self.config, self.state, self.dist
        if self.evaluate_fn and s.step > 0 and s.step != s.last_eval_step and self._due(cfg.eval_every, last):
            t0 = time.time()
            results = dict(self.evaluate_fn(self))
            s.metrics = results
            if cfg.best_metric in results:
                v = results[cfg.best_metric]
                s.best = v if s.best is None else max(s.best, v) if cfg.best_higher else min(s.best, v)
            self.log(event="eval", step=s.step, **results, seconds=round(time.time() - t0, 3))
            s.last_eval_step = s.step
        if self.sample_fn and s.step > 0 and s.step != s.last_sample_step and self._due(cfg.sample_every, last):
            s.last_sample_step = s.step
            if d.master or self.model.sharded:  # sharded weights: every rank takes part in the forward
                texts = self.sample_fn(self)
                if d.master:
                    self.log(event="samples", step=s.step, samples=texts)
                    for t in texts:
                        self.write("  > " + t.replace("\n", "\\n"))
            barrier(d)
        if self.checkpointer and s.step > start_step and self._due(cfg.checkpoint_every, last):
            self.checkpointer.save(self)

    def run(self) -> TrainState:
        """Train until config.num_steps (from the current state: 0, or where `resume` left it).
        Evaluations and samples run at the top of a step, before a periodic checkpoint, and at the
        end. On SIGINT/SIGTERM: checkpoint after the step, then raise TrainingInterrupted."""
        from tqdm import tqdm

        cfg, s = self.config, self.state
        start_step = s.step
        bar = tqdm(total=cfg.num_steps, initial=s.step, disable=not self.dist.master, unit="step",
                   dynamic_ncols=True, desc=cfg.name)
        self._bar = bar
        try:
            with StopFlag(say=self.say) as stop, contextlib.closing(bar):
                self.stop = stop
                while True:
                    last = s.step >= cfg.num_steps
                    self._periodic(start_step, last)
                    if last:
                        break
                    rec = self.train_step()
                    post = {"loss": f"{rec['smooth_loss']:.3f}", "tok_s": f"{rec['tokens_per_s']:,.0f}"}
                    if "mfu" in rec:
                        post["mfu"] = f"{rec['mfu']:.1%}"
                    bar.set_postfix(**post, refresh=False)
                    bar.update(1)
                    if rec["stop"]:
                        if self.checkpointer:
                            self.checkpointer.save(self)
                        bar.close()
                        where = f"checkpoint saved to {self.checkpointer.path}" if self.checkpointer else "no checkpointer"
                        self.say(f"stopped at step {s.step:,}: {where}; rerun the same command to resume")
                        raise TrainingInterrupted
        finally:
            self.stop = None
            self._bar = None
        return s


# ----------------------------------------------------------------------------------------------
# Periodic samples


def greedy_samples(model: torch.nn.Module, tokenizer, prompts: list[str], max_new: int, device,
                   prefix: list[int] | None = None) -> list[str]:
    """Greedy continuations of each prompt up to a new document (<|bos|>), one prompt at a time so
    each gets the context it leaves (a prompt that fills the context stays as it is), through the
    Engine (the one generation path). `prefix` defaults to [<|bos|>]."""
    from chatforge.engine import Engine

    engine = Engine(model, tokenizer, tools={}, device=device)  # fresh: its packed CPU weights are a copy
    prefix = [tokenizer.bos_id] if prefix is None else prefix
    outs = []
    for prompt in prompts:
        ids = prefix + tokenizer.encode(prompt)
        if len(ids) >= model.config.max_seq_len:
            outs.append(prompt)
            continue
        [c] = engine.generate([ids], max_tokens=max_new, temperature=0.0, stop_tokens=[tokenizer.bos_id],
                              use_tools=False)
        outs.append(prompt + c.text)
    return outs

