"""Inference engine: batched sampling with a preallocated KV cache and tool use.

    engine = Engine.from_checkpoint("runs/tiny/sft/checkpoint")
    [c] = engine.generate([engine.tok.render_prompt([{"role": "user", "content": "What is 6*7?"}])],
                          temperature=0)
    c.text, c.finish_reason, c.tool_calls

How a batch runs (nanochat's engine.py is the model for the tool loop; vLLM / HF for the rest):

1. Prefill. Prompts of different lengths are left-padded to the longest one and run in one forward
   pass. The KV cache records each row's padding (`KVCache.pad`), and the model gives every row its
   own RoPE positions and masks its padding keys (chatforge/model.py), so a padded row computes what
   it would compute alone. The cache is sized from the request (longest prompt + max_tokens, capped
   at the context), not the model's maximum: at batch 8 and a 256-token reply that is a few MB
   instead of the full context's worth.
2. Fan-out. n samples per prompt share that one prefill: the cache rows are repeated n times.
3. Decode. One token per active row per step, in lockstep. A row that finishes (stop token, stop
   string, max_tokens) is dropped from the batch and the cache (`KVCache.reorder`), so the rest
   runs at a smaller batch instead of dragging dead rows along.
4. Tools, per row. When a row samples a tool's end token (`<|python_end|>`, `<|search_end|>`), the
   engine decodes the call, runs it (chatforge/tools), and queues `<|output_start|> result
   <|output_end|>` as *forced* tokens: on the next steps the row is fed those instead of its samples,
   one per step, so the batch stays in lockstep. Forced tokens have mask 0 in `Completion.mask`, so
   training stages (SFT/RL on engine rollouts) never learn to produce tool output. A reply may make
   at most `max_tool_calls` calls and a result is cut to `max_tool_output_tokens`; unknown tools,
   malformed arguments, crashes and timeouts come back to the model as `error: ...` results.

`max_tokens` counts every token appended to a reply, inserted tool output included, so it bounds
the cache and the time of a request whatever the tools return.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from chatforge.common import ChatforgeError
from chatforge.model import GPT, KVCache, sample_next_token
from chatforge.tokenizer import TOOL_TOKENS


@dataclass
class ToolCall:
    name: str
    arguments: str
    output: str
    error: bool = False


@dataclass
class Completion:
    """One generated reply. `tokens` are everything appended after the prompt (the stop token
    included, so a training stage sees the reply exactly as produced); `mask[i]` is 1 where the model
    sampled tokens[i] and 0 where the engine inserted it (tool output)."""

    prompt_index: int
    sample_index: int
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    text: str = ""  # decoded reply without the stop token, cut before a matched stop string
    finish_reason: str = ""  # "stop" (stop token or string) | "length" (max_tokens or the context)
    tool_calls: list[ToolCall] = field(default_factory=list)


class StreamDecoder:
    """Incremental detokenizer for streaming: feed token ids, get the new text. Each push decodes only
    the new token's bytes (constant work per token, not the whole reply again); a character split
    across tokens (UTF-8) is held back until the token that completes it arrives, and bytes that can
    never form a character come out as U+FFFD, as `tok.decode` gives them.

        >>> class T:  # a stand-in tokenizer whose token 1 is half of "é" and 2 the other half
        ...     def decode_bytes(self, ids): return b"".join({1: b"\\xc3", 2: b"\\xa9", 3: b"!"}[i] for i in ids)
        >>> d = StreamDecoder(T()); [d.push(1), d.push(2), d.push(3), d.push(1), d.flush()]
        ['', 'é', '!', '', '\\ufffd']
    """

    def __init__(self, tok):
        import codecs

        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a partial character

    def push(self, token: int) -> str:
        return self.utf8.decode(self.tok.decode_bytes([token]))

    def flush(self) -> str:
        """The held-back bytes of an unfinished character (as U+FFFD); the decoder starts afresh."""
        return self.utf8.decode(b"", final=True)


@dataclass
class _Row:
    """Decoding state of one active sequence."""

    seq: int  # index into the completions list
    forced: deque = field(default_factory=deque)  # tokens to feed instead of samples (tool output)
    tool: str | None = None  # the tool pair we are inside of, between its start and end token
    call_start: int = 0  # index in tokens where the open call's arguments begin


class Engine:
    """Generation for one model + tokenizer. `tools` maps names to chatforge.tools.Tool (default: the
    global registry: python, search, and any registered user tool); `tools={}` disables tool use."""

    def __init__(self, model, tokenizer=None, tools: dict | None = None, device=None):
        self.model = model
        self.tok = tokenizer
        self.config = model.config
        self.device = device if device is not None else next(model.parameters()).device
        self.tools = tools
        self.stats: dict[str, float] = {}
        sp = getattr(tokenizer, "special_tokens", {}) or {}
        self.tool_start = {sp[s]: name for name, (s, _) in TOOL_TOKENS.items() if s in sp}
        self.tool_end = {name: sp[e] for name, (_, e) in TOOL_TOKENS.items() if e in sp}
        self.output_start, self.output_end = sp.get("<|output_start|>"), sp.get("<|output_end|>")
        self.default_stop = [sp[s] for s in ("<|assistant_end|>", "<|bos|>") if s in sp]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", tools: dict | None = None) -> "Engine":
        """Load a checkpoint folder and the tokenizer saved inside it (its `tokenizer/` folder)."""
        from chatforge.checkpoint import load_checkpoint
        from chatforge.common import get_device
        from chatforge.tokenizer import Tokenizer

        dev = get_device(device)
        model, info = load_checkpoint(path, dev)
        model.eval()
        if info["tokenizer_dir"] is None:
            raise ChatforgeError(f"checkpoint {path} has no tokenizer/ folder; the engine needs one to encode "
                                 f"prompts (save it with save_checkpoint(..., tokenizer_dir=...))")
        tok = Tokenizer.load(info["tokenizer_dir"])
        if tok.vocab_size != info["model_config"].vocab_size:
            raise ChatforgeError(f"checkpoint {path}: its tokenizer has {tok.vocab_size} tokens but the model's "
                                 f"vocabulary is {info['model_config'].vocab_size}; the folder mixes two models")
        return cls(model, tok, tools=tools, device=dev)

    def kv_bytes_per_token(self) -> int:
        """KV cache memory per token per sequence: keys and values of every layer (float32 here; bf16
        under CUDA autocast halves it)."""
        c = self.config
        dtype_bytes = 2 if self.device.type == "cuda" else 4
        return 2 * c.n_layer * c.n_kv_head * c.head_dim * dtype_bytes

    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        on_token: Callable[[int, int, bool], None] | None = None,
        use_tools: bool = True,
        max_tool_calls: int = 4,
        max_tool_output_tokens: int = 256,
    ) -> list[Completion]:
        """Generate `n` replies for each prompt (lists of token ids). Returns len(prompts) * n
        Completions, prompt-major (prompt 0's samples first).

        temperature 0 is greedy; top_k / top_p filter the distribution (model.sample_next_token);
        seed makes sampling reproducible for the same batch. stop_tokens default to <|assistant_end|>
        and <|bos|>. on_token(i, token, sampled) is called for every appended token, i indexing the
        returned list; sampled is False for inserted tool output."""
        if not prompts:
            return []
        if n < 1 or max_tokens < 1:
            raise ChatforgeError(f"n ({n}) and max_tokens ({max_tokens}) must be at least 1")
        ctx = self.config.max_seq_len
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ChatforgeError(f"prompt {i} is empty; start it with <|bos|>")
            if len(p) >= ctx:
                raise ChatforgeError(f"prompt {i} is {len(p)} tokens but the model's context is {ctx}, which "
                                     f"leaves no room for a reply; shorten it (drop early turns) to under {ctx}")
        stop_ids = set(self.default_stop if stop_tokens is None else stop_tokens)
        tools_on = (use_tools and self.tools != {} and self.tok is not None and bool(self.tool_start)
                    and self.output_start is not None)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        P, T = len(prompts), max(len(p) for p in prompts)
        cap = min(max_tokens, ctx - T)  # steps this batch can take: the longest prompt bounds the context
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else torch.autocast("cpu", enabled=False))

        # 1. prefill: left-pad to T, one forward over all prompts.
        pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=self.device)  # (P,)
        idx = torch.zeros(P, T, dtype=torch.long, device=self.device)  # (P, T), pad id 0 is masked out
        for i, p in enumerate(prompts):
            idx[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        c = self.config
        cache = KVCache(P, c.n_layer, c.n_kv_head, c.head_dim, T + cap, pad=pad if int(pad.max()) > 0 else None)
        fast = self.device.type == "cpu" and type(self.model) is GPT
        pack = self._packed() if fast else None  # the CPU fast path's packed weights, for this whole call
        t0 = time.perf_counter()
        with amp:
            logits = self.forward(idx, cache, last_only=True, pack=pack)[:, -1, :].float()  # (P, V), last slot real
        t1 = time.perf_counter()

        # 2. fan out to n samples per prompt.
        if n > 1:
            rep = torch.arange(P, device=self.device).repeat_interleave(n)  # (P*n,)
            cache.reorder(rep)
            logits = logits[rep]
        out = [Completion(i // n, i % n, len(prompts[i // n])) for i in range(P * n)]
        rows = [_Row(seq=i) for i in range(P * n)]

        # 3. decode in lockstep.
        steps = active_sum = 0
        while rows:
            sampled = sample_next_token(logits, temperature, top_k, top_p, generator).tolist()  # (B,)
            keep, feed = [], []
            for i, row in enumerate(rows):
                comp = out[row.seq]
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else sampled[i]
                comp.tokens.append(token)
                comp.mask.append(0 if forced else 1)
                if on_token is not None:
                    on_token(row.seq, token, not forced)
                reason = None if forced else self._step(row, comp, token, stop_ids, stop_strings, tools_on,
                                                        max_tool_calls, max_tool_output_tokens)
                if reason is None and len(comp.tokens) >= cap:
                    reason = "length"
                if reason is None:
                    keep.append(i)
                    feed.append(token)
                else:
                    self._finish(comp, reason, stop_ids, stop_strings)
            steps += 1
            active_sum += len(rows)
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                cache.reorder(torch.tensor(keep, device=self.device))
                rows = [rows[i] for i in keep]
            with amp:
                x = torch.tensor(feed, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
                logits = self.forward(x, cache, pack=pack)[:, -1, :].float()  # (B, V)
        t2 = time.perf_counter()
        self.stats = {"prefill_tokens": sum(len(p) for p in prompts), "prefill_s": t1 - t0,
                      "decode_steps": steps, "decode_tokens": active_sum, "decode_s": t2 - t1,
                      "cache_positions": T + cap, "batch": P * n}
        return out

    # ------------------------------------------------------------------------------------------
    # The forward pass. On CPU, a decode step of a small model is dominated by per-operator
    # overhead and by how the matmuls read their weights, not arithmetic. `_fast_forward` computes
    # exactly GPT.forward's math with a third of the operators: q/k/v and gate/up weights packed into
    # one matmul each, one fused RMSNorm over the q and k heads together, and RoPE as
    # x*cos + roll(x)*sign*sin. Every matmul weight (the head too) is kept transposed, (in, out)
    # contiguous: for the 1-row matmuls of decoding, x @ W_t streams the weight row by row and was
    # 1.6-1.9x faster than F.linear's x @ W.t() in most runs (the 17 matmuls of a depth-4 step: e.g.
    # 620 -> 330 us, 2 threads, AMD EPYC with AVX-512, torch 2.13; bench/RESULTS.md). At batch 8 the
    # two layouts cost about the same. The cost is one extra copy of the matmul weights
    # (the originals stay in the model for training), rebuilt when the weights change, e.g. between
    # RL steps. `_decode_step` is the same math for the common decode case (one new token, no
    # padding) with fewer operators still. The tests check both against GPT.forward token for token;
    # other devices (and other model classes, e.g. test doubles) use the model's own forward.

    def forward(self, idx, cache: KVCache, last_only: bool = False, pack=None):
        """pack: self._packed(), fetched once per generate call (the weights cannot change during
        one; checking their versions walks every parameter, ~50 us, which was 6% of a decode step)."""
        if self.device.type == "cpu" and type(self.model) is GPT and not torch.is_autocast_enabled("cpu"):
            pack = self._packed() if pack is None else pack
            if idx.size(1) == 1 and cache.pad is None and cache.k is not None and cache.pos < cache.max_len:
                return self._decode_step(idx[:, 0], cache, pack)[:, None]  # (B, 1, V)
            return self._fast_forward(idx, cache, last_only, pack)
        return self.model(idx, kv_cache=cache, last_only=last_only)

    def _packed(self):
        m = self.model
        version = sum(p._version for p in m.parameters())
        if getattr(self, "_pack", None) is None or self._pack[0] != version:
            c = m.config
            t = lambda w: w.t().contiguous()  # noqa: E731  (out, in) -> (in, out), see _fast_forward
            layers = []
            for blk in m.blocks:
                a, mlp = blk.attn, blk.mlp
                layers.append((
                    t(torch.cat([a.c_q.weight, a.c_k.weight, a.c_v.weight])),  # (C, (H+2Hkv)*D)
                    torch.cat([a.q_norm.weight.expand(c.n_head, -1), a.k_norm.weight.expand(c.n_kv_head, -1)]),  # (H+Hkv, D)
                    t(a.c_proj.weight),  # (H*D, C)
                    t(torch.cat([mlp.c_gate.weight, mlp.c_up.weight])),  # (C, 2I)
                    t(mlp.c_proj.weight),  # (I, C)
                ))
            half = c.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(m.sin)  # roll(x, D/2) * sign = rotate_half(x)
            self._pack = (version, layers, m.sin * sign, t(m.lm_head.weight))  # head: (C, V)
        return self._pack

    def _fast_forward(self, idx, cache: KVCache, last_only: bool = False, pack=None):
        m, c = self.model, self.config
        _, layers, sin_signed, head_t = self._packed() if pack is None else pack
        B, T = idx.shape
        T0 = cache.pos
        H, Hkv, D, C, eps = c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.norm_eps
        if T0 + T > m.cos.size(0):
            raise ValueError(f"sequence of {T0 + T} positions exceeds max_seq_len {c.max_seq_len}")
        mask = None
        if cache.pad is not None:  # as GPT.forward: per-row positions, padding keys masked
            slots = torch.arange(T0, T0 + T, device=idx.device)  # (T,)
            pos = (slots[None, :] - cache.pad[:, None]).clamp(min=0)  # (B, T)
            cos, sin = m.cos[pos][:, :, None, :], sin_signed[pos][:, :, None, :]  # (B, T, 1, D)
            keys = torch.arange(T0 + T, device=idx.device)
            causal = keys[None, :] <= slots[:, None]  # (T, T0+T)
            real = keys[None, None, :] >= cache.pad[:, None, None]  # (B, 1, T0+T)
            mask = (causal[None] & (real | (keys[None, :] == slots[:, None])[None]))[:, None]  # (B, 1, T, T0+T)
        else:
            cos, sin = m.cos[None, T0:T0 + T, None, :], sin_signed[None, T0:T0 + T, None, :]  # (1, T, 1, D)
        gqa = Hkv != H
        x = m.wte(idx)  # (B, T, C)
        for i, blk in enumerate(m.blocks):
            w_qkv, w_qk_norm, w_proj, w_gate_up, w_down = layers[i]
            h = F.rms_norm(x, (C,), blk.attn_norm.weight, eps)  # (B, T, C)
            qkv = torch.matmul(h, w_qkv).view(B, T, H + 2 * Hkv, D)  # (B, T, H+2Hkv, D)
            qk = F.rms_norm(qkv[:, :, :H + Hkv], (D,), None, eps) * w_qk_norm  # QK-norm, (B, T, H+Hkv, D)
            qk = qk * cos + qk.roll(D // 2, dims=-1) * sin  # RoPE
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
            k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, D)
            v = qkv[:, :, H + Hkv:].transpose(1, 2)  # (B, Hkv, T, D)
            k, v = cache.update(i, k, v)  # (B, Hkv, T0+T, D)
            if mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            elif T0 == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                causal = torch.ones(T, T0 + T, dtype=torch.bool, device=idx.device).tril(T0)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)
            x = x + torch.matmul(y.transpose(1, 2).reshape(B, T, H * D), w_proj)  # (B, T, C)
            gate, up = torch.matmul(F.rms_norm(x, (C,), blk.mlp_norm.weight, eps), w_gate_up).chunk(2, dim=-1)
            x = x + torch.matmul(F.silu(gate) * up, w_down)  # (B, T, C)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return torch.matmul(F.rms_norm(x, (C,), m.norm_f.weight, eps), head_t)  # (B, T, V)

    def _decode_step(self, tokens, cache: KVCache, pack):
        """One decode step, tokens (B,) -> logits (B, V): _fast_forward's math for T=1 without
        padding, in 2-D (B, C) tensors, writing k/v straight into the cache and adding the residual
        inside the matmul (addmm), which leaves ~20 operators per block."""
        m, c = self.model, self.config
        _, layers, sin_signed, head_t = pack
        B, T0 = tokens.size(0), cache.pos
        H, Hkv, D, C, eps = c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.norm_eps
        cos, sin = m.cos[T0], sin_signed[T0]  # (D,), the same position for every row
        gqa = Hkv != H
        x = F.embedding(tokens, m.wte.weight)  # (B, C)
        for i, blk in enumerate(m.blocks):
            w_qkv, w_qk_norm, w_proj, w_gate_up, w_down = layers[i]
            qkv = torch.mm(F.rms_norm(x, (C,), blk.attn_norm.weight, eps), w_qkv).view(B, H + 2 * Hkv, D)
            qk = F.rms_norm(qkv[:, :H + Hkv], (D,), None, eps) * w_qk_norm  # QK-norm, (B, H+Hkv, D)
            qk = qk * cos + qk.roll(D // 2, dims=-1) * sin  # RoPE
            cache.k[i, :, :, T0] = qk[:, H:]  # (B, Hkv, D) into slot T0
            cache.v[i, :, :, T0] = qkv[:, H + Hkv:]
            k, v = cache.k[i, :, :, :T0 + 1], cache.v[i, :, :, :T0 + 1]  # (B, Hkv, T0+1, D)
            y = F.scaled_dot_product_attention(qk[:, :H, None], k, v, enable_gqa=gqa)  # (B, H, 1, D)
            x = torch.addmm(x, y.reshape(B, H * D), w_proj)  # x + attention output, (B, C)
            gate, up = torch.mm(F.rms_norm(x, (C,), blk.mlp_norm.weight, eps), w_gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w_down)  # (B, C)
        cache.advance(1)
        x = F.rms_norm(x, (C,), m.norm_f.weight, eps)
        # From 4 rows on, the model's own (V, C) head weight is faster (MKL, torch 2.13: 229 vs 263 us
        # at 8 x 256 x 4096, one thread); below, the transposed copy (55 vs 61 us at one row).
        return F.linear(x, m.lm_head.weight) if B >= 4 else torch.mm(x, head_t)  # (B, V)

    def _step(self, row: _Row, comp: Completion, token: int, stop_ids, stop_strings, tools_on: bool,
              max_tool_calls: int, max_output: int) -> str | None:
        """Advance one row's state machine after it sampled `token`; return a finish reason or None."""
        if row.tool is not None:  # inside <|x_start|> ... : wait for the matching end token
            if token == self.tool_end[row.tool]:
                text = self.tok.decode(comp.tokens[row.call_start:-1])
                call = self._run_tool(row.tool, text, len(comp.tool_calls), max_tool_calls)
                comp.tool_calls.append(call)
                out = self.tok.encode(call.output)
                if len(out) > max_output:
                    note = self.tok.encode(f"\n...[truncated {len(out) - max_output} tokens]")
                    out = out[:max(0, max_output - len(note))] + note
                row.forced.extend([self.output_start, *out, self.output_end])
                row.tool = None
                return None
            if token in stop_ids:  # the reply ended inside an unfinished call
                return "stop"
            return None
        if token in stop_ids:
            return "stop"
        if tools_on and token in self.tool_start:
            row.tool, row.call_start = self.tool_start[token], len(comp.tokens)
            return None
        if stop_strings and self.tok is not None:
            window = max(len(s) for s in stop_strings) + 8  # a token is at least one character
            tail = self.tok.decode(comp.tokens[-window:])
            if any(s in tail for s in stop_strings):
                return "stop"
        return None

    def _run_tool(self, pair: str, text: str, calls_so_far: int, max_tool_calls: int) -> ToolCall:
        from chatforge.tools import dispatch, parse_call

        if calls_so_far >= max_tool_calls:
            name, args = parse_call(pair, text)
            return ToolCall(name, args, f"error: tool call limit reached ({max_tool_calls} per reply); "
                                        f"answer with what you have", True)
        r = dispatch(pair, text, self.tools)
        return ToolCall(r.name, r.arguments, r.output, r.error)

    def _finish(self, comp: Completion, reason: str, stop_ids, stop_strings) -> None:
        comp.finish_reason = reason
        if self.tok is None:
            return
        toks = comp.tokens[:-1] if comp.tokens and comp.tokens[-1] in stop_ids and reason == "stop" else comp.tokens
        text = self.tok.decode(toks)
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        comp.text = text[:cut] if cut >= 0 else text
