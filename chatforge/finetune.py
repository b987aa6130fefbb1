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
"""

from __future__ import annotations

import time

import torch

from chatforge.common import ChatforgeError
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
