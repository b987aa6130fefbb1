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
- No logit soft-capping, no value embeddings and no ReLU^2 (all nanochat tricks): Qwen3 has none of
  them, and being loadable by every Qwen3 runtime is worth more to us than the small gains.

Sizes come from one dial, the depth (`ModelConfig.from_depth`, nanochat's recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Qwen3RMSNorm's exact math)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None):
    """cos, sin of shape (max_len, head_dim): position t, frequency i uses angle t * theta^(-2i/D),
    and the frequencies are repeated for the two halves (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))  # (D/2,)
    t = torch.arange(max_len, device=device).float()  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + D/2]) by their angles. x: (B, T, H, D), cos/sin: (1, T, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for `max_len` positions.

    `pos` counts the positions already stored. A forward pass with a cache writes its T new keys and
    values at pos..pos+T-1 in every layer, attends over 0..pos+T-1, and then advances `pos`. The
    tensors are allocated on the first write, in the dtype and device of the keys (bf16 under
    autocast), so the cache always matches the model.

    Ragged batches (chatforge/engine.py) are left-padded: `pad` (B,) holds how many leading slots of
    each row are padding. The model then gives row b the RoPE position `slot - pad[b]` and masks its
    padding keys, so a padded row computes what it would compute alone. `pad=None` is the plain case.
    """

    def __init__(self, batch_size: int, n_layer: int, n_kv_head: int, head_dim: int, max_len: int,
                 pad=None):
        self.shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.max_len = max_len
        self.k = self.v = None  # (L, B, Hkv, T_max, D) each
        self.pos = 0
        self.pad = pad  # (B,) long tensor of left-padding lengths, or None

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
        self.shape = (self.shape[0], len(index), *self.shape[2:])


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

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        """mask: None (causal) or a boolean (B, 1, T, T0+T) of keys each query may see (ragged
        batches, built once per forward in GPT.forward)."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm over head_dim, before RoPE (as Qwen3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        gqa = self.n_kv_head != self.n_head
        if mask is not None:  # left-padded batch: the mask covers causality and padding
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, T0+T, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        elif kv_cache is None or kv_cache.pos == 0:
            if kv_cache is not None:  # prefill: store, then attend causally over the prompt
                kv_cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        else:
            T0 = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, T0+T, D)
            # query i sits at absolute position T0+i and sees keys 0..T0+i. (is_causal would align
            # the mask top-left, which is wrong when T < T0+T.) One new token sees everything.
            mask = None if T == 1 else torch.ones(T, T0 + T, dtype=torch.bool, device=x.device).tril(T0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_up = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):  # (B, T, C)
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_up(x))  # SwiGLU, (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, mask=None):  # (B, T, C)
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x


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
                last_only: bool = False):
        """idx (B, T) token ids. Returns logits (B, T, V), or with `targets` (B, T) the cross-entropy
        loss (targets of -1 are skipped): a scalar for "mean"/"sum", (B, T) for "none". last_only
        returns (B, 1, V) for the last position only: generation's prefill skips (T-1) x V of head work."""
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
            cos = self.cos[None, T0:T0 + T, None, :]  # (1, T, 1, D), absolute positions T0..T0+T-1
            sin = self.sin[None, T0:T0 + T, None, :]
        x = self.wte(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, mask)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        x = self.norm_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T),
                               ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

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

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None):
        """Sample with the KV cache: prefill the prompt once, then one token per step. idx is a
        (B, T) LongTensor or a list of ids (batch 1). Yields a (B,) tensor of next tokens per step;
        the caller stops on its own end token. Stops early at max_seq_len (the cache has no sliding
        window). temperature 0 is greedy."""
        device = self.wte.weight.device
        if not torch.is_tensor(idx):
            idx = torch.tensor([list(idx)], dtype=torch.long, device=device)
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.config.max_seq_len - T)
        if max_new_tokens <= 0:
            return
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        cache = KVCache(B, self.config.n_layer, self.config.n_kv_head, self.config.head_dim, T + max_new_tokens)
        logits = self(idx, kv_cache=cache, last_only=True)[:, -1, :]  # prefill, (B, V)
        for step in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            yield token
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], kv_cache=cache)[:, -1, :]  # (B, V)


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
