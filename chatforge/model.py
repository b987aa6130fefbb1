"""The chatforge Transformer: a decoder-only language model, one file, top to bottom.

The architecture maps one-to-one onto Hugging Face Qwen3 (`transformers.Qwen3ForCausalLM`), so an
export is a plain rename of tensors (chatforge/export.py) and vLLM / llama.cpp / transformers serve
it as they are. The choices, each with its reason:

- Pre-norm residual blocks, RMSNorm with a learnable weight (Zhang & Sennrich 2019,
  https://arxiv.org/abs/1910.07467): cheaper than LayerNorm, no mean, no bias. Normalisation runs in
  float32 and eps is 1e-6, exactly as Qwen3RMSNorm does, so bf16 training stays stable and the
  export matches transformers to float32 rounding.
- Rotary position embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864) in the "rotate half"
  layout of GPT-NeoX / Llama / Qwen (the two halves of head_dim are the pairs). No learned position
  table; theta is configurable (10k as in nanochat for short contexts, Qwen3 uses 1e6 for 32k+).
- QK-norm: an RMSNorm over head_dim on every query and key head, before RoPE (Qwen3, OLMo 2
  https://arxiv.org/abs/2501.00656, nanochat). It bounds the attention logits, which removes the
  loss spikes that otherwise appear at higher learning rates (Dehghani et al. 2023,
  https://arxiv.org/abs/2302.05442; Wortsman et al. 2023, https://arxiv.org/abs/2309.14322).
- Grouped-query attention (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245): n_kv_head <= n_head
  key/value heads shrink the KV cache at inference; n_kv_head == n_head is plain multi-head attention.
- SwiGLU MLP (Shazeer 2020, https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x)); the hidden
  size defaults to 8/3 * n_embd rounded up to a multiple of 64, which keeps the parameter count of a
  4x GELU MLP (3 matrices of 8/3 d^2 = 2 matrices of 4 d^2) and gives matmul-friendly shapes.
- No biases anywhere (PaLM, Llama): fewer parameters, no quality loss, simpler optimizers.
- Untied input embedding and output head by default (nanochat, Llama): the two do different jobs and
  untying is better at this scale; `tie_embeddings=True` ties them (GPT-2, small Qwen3s).
- Attention through torch.nn.functional.scaled_dot_product_attention: flash / memory-efficient
  kernels on GPU, the math kernel on CPU, one code path.
- One forward pass for training and generation (chatforge/engine.py calls it with a KV cache). On
  CPU, generation passes `inference_weights()`: the same matmuls with transposed and packed weight
  copies, which a decode step of a small model runs much faster (see GPT.inference_weights).
- No logit soft-capping, no value embeddings and no ReLU^2 (all nanochat tricks): Qwen3 has none of
  them, and being loadable by every Qwen3 runtime is worth more to us than the small gains.

Sizes come from one dial, the depth (`ModelConfig.from_depth`, nanochat's recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 32768  # tokens, special tokens included
    n_layer: int = 12  # Transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 768  # residual stream width
    head_dim: int = 0  # per-head width; 0 = n_embd // n_head
    intermediate_size: int = 0  # SwiGLU hidden width; 0 = 8/3 * n_embd rounded up to a multiple of 64
    max_seq_len: int = 2048  # context length (RoPE tables are built for this many positions)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-6  # RMSNorm epsilon (Qwen3's value)
    tie_embeddings: bool = False  # share the input embedding with the output head

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int, **overrides) -> "ModelConfig":
        """nanochat's single dial: width = 64 * depth (aspect ratio 64), heads of 64 below depth 16
        and of 128 from there (wider heads pay off once the model is wide), width rounded up to a whole
        number of heads, full multi-head attention.

        >>> c = ModelConfig.from_depth(12, vocab_size=32768, max_seq_len=1024)
        >>> c.n_embd, c.n_head, c.head_dim, c.intermediate_size
        (768, 12, 64, 2048)
        >>> c = ModelConfig.from_depth(20, vocab_size=65536, max_seq_len=2048)
        >>> c.n_embd, c.n_head, c.head_dim
        (1280, 10, 128)
        """
        head_dim = 64 if depth < 16 else 128
        n_embd = head_dim * math.ceil(depth * 64 / head_dim)
        n_head = n_embd // head_dim
        kwargs = dict(vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                      n_embd=n_embd, head_dim=head_dim, max_seq_len=max_seq_len)
        return cls(**{**kwargs, **overrides})


def rms_norm(x, weight, eps: float):
    """Qwen3RMSNorm's math over the last dimension: x / sqrt(mean(x^2) + eps) computed in float32,
    cast back to x's dtype, then times `weight` cast to x's dtype too. Casting the weight matters
    under autocast: a float32 weight times a bf16 activation would promote q, k (and the KV cache's
    keys) to float32 while the values stayed bf16. weight: (D,), None (no scale), or any shape that
    broadcasts against x (the inference layout's per-head QK-norm weights, (heads, D))."""
    if x.dtype == torch.float32 and weight is not None and weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.size(-1),), weight, eps)  # the same math in one call
    y = F.rms_norm(x.float(), (x.size(-1),), None, eps)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if weight is None:
        return y
    return y * (weight if weight.dtype == x.dtype else weight.to(x.dtype))


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (`rms_norm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None):
    """cos, sin of shape (max_len, head_dim) for `apply_rope`: position t, frequency i uses angle
    t * theta^(-2i/D), the frequencies repeated for the two halves (rotate-half layout). The first
    half of `sin` is negated, which folds rotate_half's sign into the table (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # (D/2,)
    t = torch.arange(max_len, device=device).float()  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    sign = torch.cat([-torch.ones(head_dim // 2, device=device), torch.ones(head_dim // 2, device=device)])
    return emb.cos(), emb.sin() * sign


def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + D/2]) by their angles: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * sign and the sign lives in the `sin` table
    (rope_tables). Two multiplies, a roll and an add: the same numbers as the cat form with fewer
    operators, which counts in a CPU decode step. x: (B, T, H, D), cos/sin broadcastable to it."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for `max_len` positions.

    `pos` counts the positions (slots) already stored. A forward pass with a cache writes its T new
    keys and values at slots pos..pos+T-1 in every layer, attends over 0..pos+T-1, and then advances
    `pos`. The tensors are allocated on the first write, in the dtype and device of the keys (bf16
    under autocast), so the cache always matches the model.

    Ragged batches (chatforge/engine.py) are left-padded: `pad` (B,) holds how many leading slots of
    each row are padding. The model then gives row b the RoPE position `slot - pad[b]` and masks its
    padding keys, so a padded row computes what it would compute alone. `pad=None` is the plain case.
    The engine's continuous batching moves rows between caches with `reorder`, `merge` and
    `trim_left`; each keeps every row's keys at the slots its padding says.
    """

    def __init__(self, batch_size: int, n_layer: int, n_kv_head: int, head_dim: int, max_len: int,
                 pad=None):
        self.shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.max_len = max_len
        self.k = self.v = None  # (L, B, Hkv, T_max, D) each
        self.pos = 0
        self.pad = pad  # (B,) long tensor of left-padding lengths, or None

    @property
    def batch_size(self) -> int:
        return self.shape[1]

    def update(self, layer: int, k, v):
        """Store k, v (B, Hkv, T, D) of `layer` at the current position; return all keys and values
        so far, (B, Hkv, pos+T, D)."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reorder(self, index) -> None:
        """Keep / repeat batch rows: row i becomes old row index[i]. The engine uses it to fan one
        prefill out to n samples and to drop finished sequences from the batch."""
        if self.k is not None:
            keep = index.tolist()
            if all(a < b for a, b in zip(keep, keep[1:])):  # dropping rows: compact in place, copying
                for j, i in enumerate(keep):                # only the positions filled so far
                    if i != j:
                        self.k[:, j, :, :self.pos] = self.k[:, i, :, :self.pos]
                        self.v[:, j, :, :self.pos] = self.v[:, i, :, :self.pos]
                self.k, self.v = self.k[:, :len(keep)], self.v[:, :len(keep)]  # views, (L, B', Hkv, T_max, D)
            else:  # fan-out (repeated rows): a new tensor
                self.k, self.v = self.k[:, index], self.v[:, index]  # (L, B', Hkv, T_max, D)
        if self.pad is not None:
            self.pad = self.pad[index]
            self._drop_zero_pad()
        self.shape = (self.shape[0], len(index), *self.shape[2:])

    def trim_left(self, n: int) -> None:
        """Drop the first n slots of every row (all of them padding: n <= min(pad)), freeing room at
        the end. A row's keys keep their RoPE positions (slot - pad), so only the slots move."""
        if n <= 0:
            return
        if self.pad is None or int(self.pad.min()) < n:
            raise ValueError(f"trim_left({n}): a row has fewer than {n} padding slots")
        n = min(n, self.pos)
        if self.k is not None:
            self.k[:, :, :, :self.pos - n] = self.k[:, :, :, n:self.pos].clone()
            self.v[:, :, :, :self.pos - n] = self.v[:, :, :, n:self.pos].clone()
        self.pos -= n
        self.pad = self.pad - n
        self._drop_zero_pad()

    def merge(self, other: "KVCache", max_len: int) -> None:
        """Append the rows of `other` after this cache's rows, in new storage of `max_len` slots.
        The two are aligned at their last filled slot: the one with fewer filled slots moves right
        (its rows get more left padding), so all rows decode on together. The engine admits new
        requests into a running batch this way."""
        pos = max(self.pos, other.pos)
        if pos > max_len:
            raise ValueError(f"KV cache merge needs {pos} slots > max_len {max_len}")
        parts = [c for c in (self, other) if c.batch_size > 0]
        if any(c.k is None for c in parts):
            raise ValueError("KV cache merge: a cache with rows but no keys (no forward pass yet)")
        L, _, Hkv, _, D = self.shape
        B = sum(c.batch_size for c in parts)
        k = v = None
        pads, b = [], 0
        for c in parts:
            if k is None:
                k = c.k.new_zeros(L, B, Hkv, max_len, D)  # zeros: padding slots are masked, never NaN
                v = c.v.new_zeros(L, B, Hkv, max_len, D)
            shift = pos - c.pos
            k[:, b:b + c.batch_size, :, shift:pos] = c.k[:, :, :, :c.pos]
            v[:, b:b + c.batch_size, :, shift:pos] = c.v[:, :, :, :c.pos]
            pad = c.pad if c.pad is not None else torch.zeros(c.batch_size, dtype=torch.long, device=k.device)
            pads.append(pad + shift)
            b += c.batch_size
        self.k, self.v, self.pos, self.max_len = k, v, pos, max_len
        self.pad = torch.cat(pads) if pads else None
        self.shape = (L, B, Hkv, max_len, D)
        self._drop_zero_pad()

    def _drop_zero_pad(self) -> None:
        """No row padded: pad None, so the model takes the unmasked (cheaper) attention path."""
        if self.pad is not None and (self.pad.numel() == 0 or int(self.pad.max()) == 0):
            self.pad = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.eps = config.norm_eps

    def forward(self, x, B: int, T: int, cos, sin, kv_cache=None, mask=None, w=None):
        """Attention before the output projection (Block applies c_proj with the residual add):
        x (B*T, C) -> (B*T, H*D). mask: None (causal) or a boolean (B, 1, T, T0+T) of keys each
        query may see (ragged batches, built once per forward in GPT.forward). w: this layer's
        `LayerWeights` (generation on CPU), else the module's own Linear layers."""
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if w is None:
            q = self.c_q(x).view(B, T, H, D)  # (B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)  # (B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)  # (B, T, Hkv, D)
            # QK-norm over head_dim, before RoPE (as Qwen3)
            q = apply_rope(self.q_norm(q), cos, sin)
            k = apply_rope(self.k_norm(k), cos, sin)
        else:  # the same math with one matmul for q, k, v and one norm + RoPE over the q and k heads
            # (float32 only, see GPT.inference_weights: the norms call torch.rms_norm directly)
            qkv = torch.mm(x, w.qkv).view(B, T, H + 2 * Hkv, D)  # (B, T, H+2Hkv, D)
            qk = torch.rms_norm(qkv[:, :, :H + Hkv], (D,), None, self.eps) * w.qk_norm  # (B, T, H+Hkv, D)
            qk = qk * cos + qk.roll(D // 2, dims=-1) * sin  # apply_rope
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        gqa = Hkv != H
        T0 = 0
        if kv_cache is not None:
            T0 = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, T0+T, D)
        if mask is not None:  # left-padded batch: the mask covers causality and padding
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        elif T == 1:  # one new token sees every key
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        elif T0 == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # query i sits at absolute position T0+i and sees keys 0..T0+i. (is_causal would align
            # the mask top-left, which is wrong when T < T0+T.)
            causal = torch.ones(T, T0 + T, dtype=torch.bool, device=x.device).tril(T0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B * T, H * D)  # (B*T, H*D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_up = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x, w=None):
        """SwiGLU before the down projection (Block applies c_proj with the residual add):
        silu(gate(x)) * up(x), (N, C) -> (N, I)."""
        if w is None:
            return F.silu(self.c_gate(x)) * self.c_up(x)
        gate, up = torch.mm(x, w.gate_up).chunk(2, dim=-1)  # (N, I) each, one matmul
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.eps = config.norm_eps

    def forward(self, x, B: int, T: int, cos, sin, kv_cache=None, mask=None, w=None):
        """Pre-norm residual block on the residual stream x (B*T, C) -> (B*T, C)."""
        if w is None:
            x = x + self.attn.c_proj(self.attn(self.attn_norm(x), B, T, cos, sin, kv_cache, mask))
            return x + self.mlp.c_proj(self.mlp(self.mlp_norm(x)))
        # Generation on CPU: the same sublayers with the inference layout's weights, the residual add
        # folded into addmm, and without nn.Module's call machinery (~2 us a call, and a decode step
        # of a small model is ~0.7 ms; a model with hooks or wrappers gets no inference weights).
        C = x.size(1)
        y = self.attn.forward(torch.rms_norm(x, (C,), w.attn_norm, self.eps), B, T, cos, sin, kv_cache, mask, w)
        x = torch.addmm(x, y, w.proj)  # x + c_proj(y), (B*T, C)
        return torch.addmm(x, self.mlp.forward(torch.rms_norm(x, (C,), w.mlp_norm, self.eps), w), w.down)


class LayerWeights(NamedTuple):
    """One block's matmul weights in the inference layout (`GPT.inference_weights`)."""

    attn_norm: torch.Tensor  # (C,) the block's norm weights (the parameters themselves)
    mlp_norm: torch.Tensor  # (C,)
    qkv: torch.Tensor  # (C, (H+2Hkv)*D): c_q, c_k, c_v side by side, transposed
    qk_norm: torch.Tensor  # (H+Hkv, D): q_norm's weight for each query head, then k_norm's per kv head
    proj: torch.Tensor  # (H*D, C)
    gate_up: torch.Tensor  # (C, 2I): c_gate, c_up side by side, transposed
    down: torch.Tensor  # (I, C)


@dataclass
class InferenceWeights:
    """A copy of the model's matmul weights laid out for CPU decoding; see GPT.inference_weights."""

    layers: list[LayerWeights]
    head: torch.Tensor  # (C, V): lm_head transposed
    version: tuple  # the weights it was built from (GPT._weights_version)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # RoPE tables are derived, not learned: non-persistent buffers stay out of the state dict.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight (also usable after building on the meta device and `to_empty`).

        - Linear layers: normal with std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)), the spectral
          condition of Yang et al. 2023 (https://arxiv.org/abs/2310.17813), as in nanochat.
        - Residual output projections (attn.c_proj, mlp.c_proj) start at zero, so every block starts as
          the identity (modded-nanogpt, nanochat); an untied lm_head also starts at zero, so the initial
          loss is exactly ln(vocab_size) -- a free sanity check.
        - Embedding: std 1.0 when untied (nanochat: the pre-norms rescale it anyway); std 0.02 when tied
          (GPT-2), because then it is also the output head and must not give huge initial logits.
        - RMSNorm weights: ones.
        """
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02 if cfg.tie_embeddings else 1.0)
        if not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)
        self.cos, self.sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.wte.weight.device)

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                last_only: bool = False, weights: InferenceWeights | None = None, hidden: bool = False):
        """idx (B, T) token ids. Returns logits (B, T, V), or with `targets` (B, T) the cross-entropy
        loss (targets of -1 are skipped): a scalar for "mean"/"sum", (B, T) for "none". last_only
        returns (B, 1, V) for the last position only: generation's prefill skips (T-1) x V of head work.
        weights: `self.inference_weights()` for generation (the engine passes them), else None.
        hidden: return the final-norm hidden states (B, T, C) instead of logits, for heads of one's
        own on the same forward pass (the reward model's scalar head, chatforge/reward_model.py)."""
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.pos
        if T0 + T > self.cos.size(0):
            raise ValueError(f"sequence of {T0 + T} positions exceeds max_seq_len {self.config.max_seq_len}")
        mask = None
        if kv_cache is not None and kv_cache.pad is not None:
            # Left-padded rows: row b's token in slot s sits at position s - pad[b] of its own
            # sequence, and may see keys in slots pad[b]..s (plus itself, so a padding query never
            # has an empty softmax row; its output is never used).
            slots = torch.arange(T0, T0 + T, device=idx.device)  # (T,)
            pos = (slots[None, :] - kv_cache.pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]  # (B, T, 1, D)
            keys = torch.arange(T0 + T, device=idx.device)  # (T0+T,)
            causal = keys[None, :] <= slots[:, None]  # (T, T0+T)
            real = keys[None, None, :] >= kv_cache.pad[:, None, None]  # (B, 1, T0+T)
            mask = (causal[None] & (real | (keys[None, :] == slots[:, None])[None]))[:, None]  # (B, 1, T, T0+T)
        else:
            cos = self.cos[T0:T0 + T, None]  # (T, 1, D), absolute positions T0..T0+T-1
            sin = self.sin[T0:T0 + T, None]
        x = F.embedding(idx, self.wte.weight).view(B * T, -1)  # (B*T, C): the residual stream, 2-D
        if weights is None:
            for block in self.blocks:
                x = block(x, B, T, cos, sin, kv_cache, mask)  # (B*T, C)
        else:  # Block.forward: the same block, called directly (see there)
            for block, w in zip(self.blocks, weights.layers):
                x = block.forward(x, B, T, cos, sin, kv_cache, mask, w)  # (B*T, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x.view(B, T, -1)[:, -1]  # (B, C)
        x = rms_norm(x, self.norm_f.weight, self.config.norm_eps)
        if hidden:
            return x.view(B, 1 if last_only else T, -1)  # (B, T, C)
        # The transposed head copy is faster for 1-3 rows, the model's own (V, C) weight from 4 rows
        # on (MKL, torch 2.13, one thread: 55 vs 61 us at one row, 229 vs 263 us at 8 x 256 x 4096).
        if weights is not None and x.size(0) < 4:
            logits = torch.mm(x, weights.head)  # (N, V)
        else:
            logits = self.lm_head(x)  # (N, V)
        logits = logits.view(B, 1 if last_only else T, -1)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T),
                               ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    # Generation on CPU. A decode step of a small model is dominated by per-operator overhead and by
    # how the matmuls read their weights, not by arithmetic. For 1-row matmuls, x @ W_t with W_t
    # kept (in, out) contiguous streams the weight row by row and was 1.6-1.9x faster than
    # F.linear's x @ W.t() in most runs (the 17 matmuls of a depth-4 step: e.g. 620 -> 330 us, 2
    # threads, AMD EPYC with AVX-512, torch 2.13; bench/RESULTS.md); at batch 8 both layouts cost
    # about the same. Packing q/k/v and gate/up into one matmul each also removes operators. The
    # cost is one extra copy of the matmul weights, so the engine holds it for as long as it lives
    # (the parameters stay as they are for training). On GPU the weights are used as they are.

    def _weights_version(self) -> tuple:
        """Changes whenever a weight is updated in place (an optimizer step bumps `_version`) or
        replaced (load_state_dict into new storage, .to(): a new data_ptr)."""
        params = list(self.parameters())
        return (sum(p._version for p in params), tuple(p.data_ptr() for p in params))

    @torch.no_grad()
    def inference_weights(self, previous: InferenceWeights | None = None) -> InferenceWeights:
        """The matmul weights in the inference layout (a copy; pass it to forward as `weights=`),
        for a float32 model run without autocast (that path calls the float32 kernels directly).
        previous: an earlier result, returned as it is when the weights have not changed since."""
        version = self._weights_version()
        if previous is not None and previous.version == version:
            return previous
        if self.wte.weight.dtype != torch.float32:
            raise ValueError(f"inference weights are for float32 models; this one is {self.wte.weight.dtype}")
        c = self.config
        t = lambda w: w.t().contiguous()  # noqa: E731  (out, in) -> (in, out)
        layers = []
        for blk in self.blocks:
            a, mlp = blk.attn, blk.mlp
            layers.append(LayerWeights(
                attn_norm=blk.attn_norm.weight, mlp_norm=blk.mlp_norm.weight,
                qkv=t(torch.cat([a.c_q.weight, a.c_k.weight, a.c_v.weight])),  # (C, (H+2Hkv)*D)
                qk_norm=torch.cat([a.q_norm.weight.expand(c.n_head, -1), a.k_norm.weight.expand(c.n_kv_head, -1)]),
                proj=t(a.c_proj.weight),  # (H*D, C)
                gate_up=t(torch.cat([mlp.c_gate.weight, mlp.c_up.weight])),  # (C, 2I)
                down=t(mlp.c_proj.weight),  # (I, C)
            ))
        return InferenceWeights(layers, t(self.lm_head.weight), version)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count. exclude_embedding drops the input embedding table (a lookup, no matmul
        work, Kaplan et al. 2020), unless it is tied to the head, which does matmul work."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return n

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul weight (2 forward, 4 backward) plus the attention
        scores and mixing, 12 * n_layer * n_head * head_dim * seq_len (PaLM appendix B,
        https://arxiv.org/abs/2204.02311; nanochat). Used for MFU."""
        c = self.config
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * c.max_seq_len

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer treatment, each exactly once: "matrix" (2-D weights inside the
        blocks, for Muon), "embedding", "lm_head" (empty when tied: the table is in "embedding") and
        "scalar" (norm weights and any other 1-D parameter, for AdamW)."""
        groups = {
            "matrix": [p for p in self.blocks.parameters() if p.ndim == 2],
            "embedding": [self.wte.weight],
            "lm_head": [] if self.config.tie_embeddings else [self.lm_head.weight],
            "scalar": [p for p in self.parameters() if p.ndim < 2],
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups


def sample_next_token(logits, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None):
    """Pick one token per row of logits (B, V) -> (B,). temperature 0 is argmax; top_k keeps the k
    most likely tokens; top_p keeps the smallest set whose probability reaches p (Holtzman et al. 2019,
    https://arxiv.org/abs/1904.09751)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
