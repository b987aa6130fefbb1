"""LoRA: low-rank adapters on chatforge's own Linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A target Linear y = x W^T becomes y = x W^T + (alpha / r) * dropout(x) A^T B^T with W frozen, A (r, in)
and B (out, r) trained; B starts at zero, so the adapted model starts exactly as the base model, and A
with PEFT's default (Kaiming-uniform, a = sqrt(5)). Only r * (in + out) numbers per layer train.

    names = apply_lora(model, rank=8, alpha=16, dropout=0.05, targets=("c_q", "c_k", "c_v", "attn.c_proj"))
    trainable, total = count_parameters(model)
    ... train lora_parameters(model) ...
    merge_lora(model)             # W <- W + (alpha / r) B A, plain nn.Linear again: save, export, serve
    export_peft_adapter(model_before_merge, "adapter/")   # or keep the adapter: PEFT format, HF names

Targets name modules by their dotted path or its tail: "c_q" is every block's attn.c_q, "c_proj" both
attn.c_proj and mlp.c_proj, "mlp.c_proj" only the MLP's, "lm_head" the head (untied only).

Why our own layer and not `peft` on our modules: the layer is the few lines below, keeps GPT a plain
nn.Module (no PeftModel wrapper around forward(), no extra dependency at train time), and lets
`LoRALinear.weight` answer with the merged weight, so code that reads weights directly (the engine's
CPU fast path) generates with the adapter in. PEFT stays the reference: `export_peft_adapter` writes
PEFT's adapter format under Hugging Face names, and the tests load it with `peft` onto the exported
transformers model and compare logits with ours (bench/bench_lora.py compares speed).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.common import ChatforgeError, atomic_write_text

DEFAULT_TARGETS = ("c_q", "c_k", "c_v", "attn.c_proj", "c_gate", "c_up", "mlp.c_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus a trained low-rank update. x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ChatforgeError(f"LoRA rank {rank}: must be >= 1")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adapters_disabled(): the layer is its base Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The update (alpha / r) B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + (alpha / r) B A, (out, in): what code reading `.weight` must see."""
        return self.base.weight if self.disabled else self.base.weight + self.delta()

    def forward(self, x):
        if self.disabled:
            return self.base(x)
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return self.base(x) + lora * self.scaling


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose path matches a target in a LoRALinear and freeze everything else.
    Returns the wrapped paths. An unknown target, a non-Linear match or a tied head is an error."""
    targets = list(targets)
    if not targets:
        raise ChatforgeError("LoRA needs at least one target module (e.g. c_q, c_v)")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ChatforgeError("the model already has LoRA adapters; merge_lora first to add new ones")
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    wrapped = []
    for t in targets:
        hits = [p for p in linears if _matches(p, t)]
        if not hits:
            other = [p for p, m in model.named_modules() if p and _matches(p, t)]
            known = sorted({p.split(".")[-1] for p in linears} | {".".join(p.split(".")[-2:]) for p in linears})
            raise ChatforgeError(f"LoRA target {t!r} " + (f"is not a Linear layer ({other[0]})" if other else
                                 f"matches no Linear layer; known: {', '.join(known)}"))
        wrapped += [p for p in hits if p not in wrapped]
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and "lm_head" in wrapped:
        raise ChatforgeError("LoRA on lm_head of a model with tied embeddings would change the embedding too; "
                             "leave lm_head out of the targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in wrapped:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(linears[path], rank, alpha, dropout))
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """`with adapters_disabled(model):` the model computes with its base weights only (every adapter
    off), then the adapters come back. DPO's and PPO's frozen reference is then the base model itself,
    with no second copy of its weights in memory (as TRL does for PEFT models). Forward passes only:
    the engine's cached CPU weights are not rebuilt for the switch. A model without adapters is an
    error: its "reference" would silently be the policy itself."""
    mods = list(lora_modules(model).values())
    if not mods:
        raise ChatforgeError("adapters_disabled: the model has no LoRA adapters, so there is no base model to "
                             "switch to; keep a frozen copy as the reference instead")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


class AdaptersOff:
    """A callable view of a LoRA model that computes with its base weights: `AdaptersOff(model)(ids)` is
    `model(ids)` inside adapters_disabled. For code that takes a reference model to call (GRPO's rollout
    source scores its KL reference this way), so the reference costs no second copy of the weights."""

    def __init__(self, model: nn.Module):
        if not lora_modules(model):
            raise ChatforgeError("AdaptersOff: the model has no LoRA adapters; use a frozen copy as the reference")
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRALinear), the only ones an optimizer should get."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W <- W + (alpha / r) B A) and put the plain nn.Linear
    back, so the model saves, exports and serves as an ordinary GPT. All parameters are trainable again."""
    for path, m in lora_modules(model).items():
        m.base.weight.copy_(m.weight)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the model would have after merge_lora, without changing the model: every
    adapter's '<path>.base.weight', '.lora_A' and '.lora_B' become one '<path>.weight' = W + (alpha / r) B A.
    What a checkpoint of a LoRA run stores, so it loads, exports and serves as a plain GPT while
    training goes on with the adapters."""
    state = dict(model.state_dict())
    for path, m in lora_modules(model).items():
        for key in ("base.weight", "lora_A", "lora_B"):
            state.pop(f"{path}.{key}", None)
        state[f"{path}.weight"] = m.weight.detach()
    return state


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under '<module path>.lora_A' / '.lora_B' (for a resumable LoRA run:
    base checkpoint + this)."""
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{path}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{path}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load lora_state_dict output into a model with the same adapters applied; missing or extra
    tensors, or a rank that differs, are an error naming them."""
    mods = lora_modules(model)
    expected = {f"{p}.lora_{ab}" for p in mods for ab in "AB"}
    if set(state) != expected:
        raise ChatforgeError(f"LoRA adapter tensors do not match the model's adapters: missing "
                             f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}; "
                             f"apply_lora with the same targets first")
    for p, m in mods.items():
        for ab in "AB":
            src, dst = state[f"{p}.lora_{ab}"], getattr(m, f"lora_{ab}")
            if src.shape != dst.shape:
                raise ChatforgeError(f"LoRA tensor {p}.lora_{ab} has shape {tuple(src.shape)}, the model's is "
                                     f"{tuple(dst.shape)}: use the same rank")
            dst.copy_(src)


def export_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str = "") -> Path:
    """Write the adapters in PEFT's format under Hugging Face Qwen3 names (adapter_config.json +
    adapter_model.safetensors), loadable with `peft.PeftModel.from_pretrained(<exported base>, out_dir)`
    and servable by vLLM's multi-LoRA. All adapters must share one rank, alpha and dropout (PEFT's format
    has one of each)."""
    from safetensors.torch import save_file

    from chatforge.export import to_hf_name

    mods = lora_modules(model)
    if not mods:
        raise ChatforgeError("the model has no LoRA adapters to export")
    settings = {(m.rank, m.alpha, getattr(m.lora_dropout, "p", 0.0)) for m in mods.values()}
    if len(settings) != 1:
        raise ChatforgeError(f"adapters with different rank/alpha/dropout {sorted(settings)} cannot share one PEFT config")
    (rank, alpha, dropout), = settings
    tensors, names = {}, set()
    for path, m in mods.items():
        hf = to_hf_name(path + ".weight").removesuffix(".weight")  # e.g. model.layers.0.self_attn.q_proj
        names.add(hf.split(".")[-1])
        tensors[f"base_model.model.{hf}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(names),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "init_lora_weights": True, "modules_to_save": None}
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out
