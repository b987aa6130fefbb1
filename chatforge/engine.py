"""Inference engine: batched sampling with a KV cache, tool use, and continuous batching.

Two ways in. `Engine.generate` runs a list of prompts to the end:

    engine = Engine.from_checkpoint("runs/tiny/sft/checkpoint")
    [c] = engine.generate([engine.tok.render_prompt([{"role": "user", "content": "What is 6*7?"}])],
                          temperature=0)
    c.text, c.finish_reason, c.tool_calls

`Batch` is the step-level object under it, for a server that admits requests while others run
(continuous batching, as in Orca, Yu et al. 2022, https://www.usenix.org/conference/osdi22/presentation/yu,
and vLLM):

    batch = engine.batch(max_batch_size=16)
    r = batch.add(prompt_ids, SamplingParams(max_tokens=200, temperature=0.7, seed=1))  # -> Request
    while batch:                      # True while any request is waiting or running
        for ev in batch.step():       # one token for every running row; admits waiting requests first
            ev.request, ev.index      # which request, which of its n samples
            ev.token, ev.sampled      # the appended token; sampled=False for inserted tool output
            ev.tool_call              # a ToolCall when this token closed a call (its output follows)
            ev.finish_reason          # "stop" | "length" on the row's last token, else None
    batch.cancel(r)                   # drops a waiting or running request and frees its rows
    r.completions                     # one Completion per sample (tokens, mask, text, tool_calls)

`SamplingParams` are per request: max_tokens, temperature, top_k, top_p, frequency_penalty and
presence_penalty (OpenAI's), seed (a request's own random stream: a seeded request samples the same
tokens whatever else is in the batch), n, stop_tokens, stop_strings, use_tools, max_tool_calls,
max_tool_output_tokens, mask_control.
A Batch is not thread-safe: drive add / step / cancel from one thread (an asyncio server runs step()
in a worker thread and hands it the adds and cancels between steps). Tools run inside step(), so a
slow tool holds up the whole batch for as long as it runs (at most its timeout).

How a batch runs (nanochat's engine.py is the model for the tool loop; vLLM / HF for the rest):

1. Prefill. Requests admitted in one step are left-padded to the longest prompt and run in one
   forward pass. The KV cache records each row's padding (`KVCache.pad`), and the model gives every
   row its own RoPE positions and masks its padding keys (chatforge/model.py), so a padded row
   computes what it would compute alone. n samples of a request share its prefill (the cache rows
   are repeated n times).
2. Admission into a running batch. The new rows' cache is merged into the running one, aligned at
   the last filled slot (`KVCache.merge`): the side with fewer slots gets more left padding. The
   cache is sized from the requests (the slot the longest remaining reply can reach, capped at the
   context), not the model's maximum: at batch 8 and a 256-token reply that is a few MB instead of
   the full context's worth. When the slots run out, the leading slots that every row has as
   padding are dropped (`KVCache.trim_left`).
3. Decode. One token per running row per step, in lockstep. A row that finishes (stop token, stop
   string, max_tokens, the context) or is cancelled is dropped from the batch and the cache
   (`KVCache.reorder`), so the rest runs at a smaller batch instead of dragging dead rows along.
4. Tools, per row. When a row samples a tool's end token (`<|python_end|>`, `<|search_end|>`), the
   engine decodes the call, runs it (chatforge/tools), and queues `<|output_start|> result
   <|output_end|>` as *forced* tokens: on the next steps the row is fed those instead of its samples,
   one per step, so the batch stays in lockstep. Forced tokens have mask 0 in `Completion.mask`, so
   training stages (SFT/RL on engine rollouts) never learn to produce tool output. A reply may make
   at most `max_tool_calls` calls and a result is cut to `max_tool_output_tokens`; unknown tools,
   malformed arguments, crashes and timeouts come back to the model as `error: ...` results.
5. Control tokens. In an assistant turn the model may only write text, <|assistant_end|> and, with
   tools on, a tool call. Every other special token (<|bos|>, system / user / assistant starts and
   ends, <|output_start|> / <|output_end|>: only the engine writes tool output) gets logit -inf
   before sampling, as do the tool tokens when tools are off, an end token outside a call and a
   start token inside one. This is on for chat prompts (the prompt ends inside an assistant turn,
   as `render_prompt` makes it) and off for raw text; `mask_control` forces either.

`max_tokens` counts every token appended to a reply, inserted tool output included, so it bounds
the cache and the time of a request whatever the tools return.

The engine has no forward pass of its own: it calls the model (chatforge/model.py), passing on CPU
the model's inference layout of its weights (`GPT.inference_weights`), which the engine keeps for as
long as it lives and refreshes when the weights change (checked when requests are admitted).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from chatforge.common import ChatforgeError
from chatforge.model import GPT, KVCache, sample_next_token
from chatforge.tokenizer import TOOL_TOKENS

# Special tokens the model never writes inside an assistant turn (the engine writes tool output).
FORBIDDEN_IN_REPLY = ("<|bos|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                      "<|assistant_start|>", "<|output_start|>", "<|output_end|>")
# The tokens that open or close a conversation turn, to tell whether a prompt ends inside a reply.
TURN_TOKENS = ("<|bos|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
               "<|assistant_start|>", "<|assistant_end|>")


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

    prompt_index: int  # generate(): the prompt's index; Batch: the request's id
    sample_index: int
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    text: str = ""  # decoded reply without the stop token, cut before a matched stop string
    finish_reason: str = ""  # "stop" (stop token or string) | "length" (max_tokens or the context) | "cancelled"
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops (the keywords of Engine.generate)."""

    max_tokens: int = 256  # tokens appended to the reply, inserted tool output included
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    # OpenAI's penalties, in [-2, 2]: a token's logit drops by frequency_penalty times the times this
    # reply has sampled it, and by presence_penalty once it has sampled it at all. They break the
    # greedy loops of small models ("- \n- \n- ...": bench/RESULTS.md, the laptop preset's second run).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # the request's own random stream; None: torch's global one
    n: int = 1  # samples of this prompt, sharing one prefill
    stop_tokens: Sequence[int] | None = None  # None: <|assistant_end|> and <|bos|>
    stop_strings: Sequence[str] = ()  # stop when the decoded reply contains one (cut from `text`)
    use_tools: bool = True  # run tool calls (when the engine has tools and the tokenizer their tokens)
    max_tool_calls: int = 4  # calls per reply; later calls get an error result
    max_tool_output_tokens: int = 256  # a tool result is cut to this many tokens
    mask_control: bool | None = None  # mask control tokens (module docstring, 5.); None: for chat prompts


def penalize(logits: torch.Tensor, tokens: Sequence[int], mask: Sequence[int], frequency: float,
             presence: float) -> None:
    """OpenAI's penalties on one row's next-token logits (V,), in place: minus frequency x count minus
    presence x (count > 0), counting the tokens this reply sampled (mask 1), not inserted tool output.

    >>> x = torch.zeros(4); penalize(x, [1, 1, 2, 3], [1, 1, 1, 0], 0.5, 0.25); x.tolist()
    [0.0, -1.25, -0.75, 0.0]
    """
    sampled = [t for t, m in zip(tokens, mask) if m]
    if not sampled:
        return
    counts = torch.bincount(torch.tensor(sampled, device=logits.device), minlength=logits.shape[-1])
    counts = counts[:logits.shape[-1]].to(logits.dtype)  # (V,)
    logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)


@dataclass
class Request:
    """A handle to one request of a Batch: `completions` fill in as it runs."""

    id: int
    prompt: list[int]
    params: SamplingParams
    completions: list[Completion]
    status: str = "waiting"  # waiting | running | finished | cancelled
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.status in ("finished", "cancelled")


@dataclass
class Event:
    """One token appended to one sample of a request (see the module docstring)."""

    request: Request
    index: int  # which of the request's n samples
    token: int
    sampled: bool  # False for tool output the engine inserted
    finish_reason: str | None = None  # set on the sample's last token
    tool_call: ToolCall | None = None  # set on the token that closed a tool call


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
    """Decoding state of one running sample (one row of the batch and of its KV cache)."""

    request: Request
    index: int  # sample index within the request
    cap: int  # tokens this row may append: max_tokens, or what the context leaves
    stop_ids: frozenset
    tools_on: bool
    mask_control: bool
    forced: deque = field(default_factory=deque)  # tokens to feed instead of samples (tool output)
    tool: str | None = None  # the tool pair we are inside of, between its start and end token
    call_start: int = 0  # index in tokens where the open call's arguments begin

    @property
    def comp(self) -> Completion:
        return self.request.completions[self.index]


class Engine:
    """Generation for one model + tokenizer. `tools` maps names to chatforge.tools.Tool (default: the
    global registry: python, search, and any registered user tool); `tools={}` disables tool use.
    dtype: the compute dtype; None is bf16 autocast on CUDA and the model's own dtype elsewhere; a
    lower precision than the model's runs under autocast (e.g. torch.bfloat16 on CPU)."""

    def __init__(self, model, tokenizer=None, tools: dict | None = None, device=None, dtype=None):
        self.model = model
        self.tok = tokenizer
        self.config = model.config
        self.device = device if device is not None else next(model.parameters()).device
        self.device = torch.device(self.device)
        param_dtype = next(model.parameters()).dtype
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and param_dtype == torch.float32 else param_dtype
        self.dtype = dtype
        self.autocast = dtype != param_dtype
        self.tools = tools
        self.stats: dict[str, float] = {}
        sp = getattr(tokenizer, "special_tokens", {}) or {}
        self.tool_start = {sp[s]: name for name, (s, _) in TOOL_TOKENS.items() if s in sp}
        self.tool_end = {name: sp[e] for name, (_, e) in TOOL_TOKENS.items() if e in sp}
        self.output_start, self.output_end = sp.get("<|output_start|>"), sp.get("<|output_end|>")
        self.default_stop = [sp[s] for s in ("<|assistant_end|>", "<|bos|>") if s in sp]
        self.assistant_start = sp.get("<|assistant_start|>")
        self.turn_tokens = {sp[s] for s in TURN_TOKENS if s in sp}
        self._forbidden = [sp[s] for s in FORBIDDEN_IN_REPLY if s in sp]
        self._banned: dict[tuple, torch.Tensor] = {}  # (tools_on, open tool) -> ids masked in a reply
        self._weights = None  # the model's inference layout (GPT.inference_weights), CPU float32 only

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
        """KV cache memory per token per sequence: keys and values of every layer, in the compute
        dtype (float32: 4 bytes, bf16 under autocast: 2)."""
        c = self.config
        return 2 * c.n_layer * c.n_kv_head * c.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def batch(self, max_batch_size: int | None = None) -> "Batch":
        """A step-level batch for continuous batching (see the module docstring)."""
        return Batch(self, max_batch_size)

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
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        on_token: Callable[[int, int, bool], None] | None = None,
        use_tools: bool = True,
        max_tool_calls: int = 4,
        max_tool_output_tokens: int = 256,
        mask_control: bool | None = None,
    ) -> list[Completion]:
        """Generate `n` replies for each prompt (lists of token ids). Returns len(prompts) * n
        Completions, prompt-major (prompt 0's samples first).

        temperature 0 is greedy; top_k / top_p filter the distribution (model.sample_next_token);
        frequency_penalty / presence_penalty: see SamplingParams; seed makes sampling reproducible for the
        same batch. stop_tokens default to <|assistant_end|> and <|bos|>. on_token(i, token, sampled) is
        called for every appended token, i indexing the returned list; sampled is False for inserted tool
        output. mask_control: see SamplingParams."""
        if not prompts:
            return []
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                seed=None, n=n, stop_tokens=stop_tokens, stop_strings=tuple(stop_strings),
                                use_tools=use_tools, max_tool_calls=max_tool_calls,
                                max_tool_output_tokens=max_tool_output_tokens, mask_control=mask_control)
        self.check_params(params)
        for i, p in enumerate(prompts):
            self.check_prompt(p, f"prompt {i}")
        # One random stream for the whole call (as before continuous batching): rows with the same
        # settings are sampled in one call.
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        batch = Batch(self)
        requests = [batch.add(p, params, _generator=generator) for p in prompts]
        t0 = time.perf_counter()
        while batch:
            for ev in batch.step():
                if on_token is not None:
                    on_token(ev.request.id * n + ev.index, ev.token, ev.sampled)
        s = batch.stats
        self.stats = {"prefill_tokens": s["prefill_tokens"], "prefill_s": s["prefill_s"],
                      "decode_steps": s["steps"], "decode_tokens": s["decode_tokens"],
                      "decode_s": time.perf_counter() - t0 - s["prefill_s"],
                      "cache_positions": s["cache_positions"], "batch": s["max_rows"]}
        return [c for r in requests for c in r.completions]

    def check_prompt(self, prompt: Sequence[int], name: str = "the prompt") -> None:
        ctx = self.config.max_seq_len
        if len(prompt) == 0:
            raise ChatforgeError(f"{name} is empty; start it with <|bos|>")
        if len(prompt) >= ctx:
            raise ChatforgeError(f"{name} is {len(prompt)} tokens but the model's context is {ctx}, which "
                                 f"leaves no room for a reply; shorten it (drop early turns) to under {ctx}")
        V = self.config.vocab_size
        bad = next((t for t in prompt if not 0 <= int(t) < V), None)
        if bad is not None:
            raise ChatforgeError(f"{name} holds token id {bad}, outside the model's vocabulary 0..{V - 1}")

    @staticmethod
    def check_params(p: SamplingParams) -> None:
        if p.n < 1 or p.max_tokens < 1:
            raise ChatforgeError(f"n ({p.n}) and max_tokens ({p.max_tokens}) must be at least 1")
        if not p.temperature >= 0 or (p.top_k is not None and p.top_k < 1) or \
                (p.top_p is not None and not 0 < p.top_p <= 1):
            raise ChatforgeError(f"temperature {p.temperature} must be >= 0, top_k {p.top_k} >= 1 and "
                                 f"top_p {p.top_p} in (0, 1]")
        if not (-2 <= p.frequency_penalty <= 2 and -2 <= p.presence_penalty <= 2):
            raise ChatforgeError(f"frequency_penalty {p.frequency_penalty} and presence_penalty "
                                 f"{p.presence_penalty} must be in [-2, 2] (0 = off)")

    # ------------------------------------------------------------------------------------------
    # The forward pass: the model's own. On CPU in float32 it gets the inference layout of its
    # weights (GPT.inference_weights: transposed and packed copies; why in chatforge/model.py).

    def refresh_weights(self):
        """The inference weights for this model, rebuilt if the weights changed (an RL step between
        two calls); None where the model runs as it is (GPU, autocast, wrapped or stand-in models)."""
        m = self.model
        if self.device.type == "cpu" and type(m) is GPT and not self.autocast:
            self._weights = m.inference_weights(self._weights)
        else:
            self._weights = None
        return self._weights

    def amp(self):
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.autocast
                else contextlib.nullcontext())

    def forward(self, idx, cache: KVCache, last_only: bool = False, weights=None):
        """The model's forward pass with a KV cache (logits (B, T, V), or (B, 1, V) with last_only)."""
        if weights is not None:
            return self.model(idx, kv_cache=cache, last_only=last_only, weights=weights)
        with self.amp():
            return self.model(idx, kv_cache=cache, last_only=last_only)

    # ------------------------------------------------------------------------------------------
    # Per-row rules: control tokens, the tool state machine, finishing.

    def is_chat_prompt(self, prompt: Sequence[int]) -> bool:
        """True when the prompt ends inside an assistant turn: its last turn token is
        <|assistant_start|> (a tool output inside the turn does not close it)."""
        for t in reversed(prompt):
            if t in self.turn_tokens:
                return t == self.assistant_start
        return False

    def banned_ids(self, row: _Row) -> torch.Tensor | None:
        """Token ids this row must not sample now (module docstring, 5.), or None."""
        if not row.mask_control:
            return None
        key = (row.tools_on, row.tool)
        ids = self._banned.get(key)
        if ids is None:
            banned = set(self._forbidden)
            if not row.tools_on:
                banned |= set(self.tool_start) | set(self.tool_end.values())
            elif row.tool is None:  # outside a call: an end token closes nothing
                banned |= set(self.tool_end.values())
            else:  # inside a call: only its own end token
                banned |= set(self.tool_start) | {e for n, e in self.tool_end.items() if n != row.tool}
            ids = self._banned[key] = torch.tensor(sorted(banned), dtype=torch.long, device=self.device)
        return ids

    def _step_row(self, row: _Row, token: int) -> tuple[str | None, ToolCall | None]:
        """Advance one row's state machine after it sampled `token`: (finish reason or None, the
        tool call this token closed or None)."""
        comp, p = row.comp, row.request.params
        if row.tool is not None:  # inside <|x_start|> ... : wait for the matching end token
            if token == self.tool_end[row.tool]:
                text = self.tok.decode(comp.tokens[row.call_start:-1])
                call = self._run_tool(row.tool, text, len(comp.tool_calls), p.max_tool_calls)
                comp.tool_calls.append(call)
                out = self.tok.encode(call.output)
                if len(out) > p.max_tool_output_tokens:
                    note = self.tok.encode(f"\n...[truncated {len(out) - p.max_tool_output_tokens} tokens]")
                    out = out[:max(0, p.max_tool_output_tokens - len(note))] + note
                row.forced.extend([self.output_start, *out, self.output_end])
                row.tool = None
                return None, call
            if token in row.stop_ids:  # the reply ended inside an unfinished call
                return "stop", None
            return None, None
        if token in row.stop_ids:
            return "stop", None
        if row.tools_on and token in self.tool_start:
            row.tool, row.call_start = self.tool_start[token], len(comp.tokens)
            return None, None
        if p.stop_strings and self.tok is not None:
            window = max(len(s) for s in p.stop_strings) + 8  # a token is at least one character
            tail = self.tok.decode(comp.tokens[-window:])
            if any(s in tail for s in p.stop_strings):
                return "stop", None
        return None, None

    def _run_tool(self, pair: str, text: str, calls_so_far: int, max_tool_calls: int) -> ToolCall:
        from chatforge.tools import dispatch, parse_call

        if calls_so_far >= max_tool_calls:
            name, args = parse_call(pair, text)
            return ToolCall(name, args, f"error: tool call limit reached ({max_tool_calls} per reply); "
                                        f"answer with what you have", True)
        r = dispatch(pair, text, self.tools)
        return ToolCall(r.name, r.arguments, r.output, r.error)

    def _finish(self, row: _Row, reason: str) -> None:
        comp, p = row.comp, row.request.params
        comp.finish_reason = reason
        if self.tok is None:
            return
        stop = reason == "stop" and comp.tokens and comp.tokens[-1] in row.stop_ids
        text = self.tok.decode(comp.tokens[:-1] if stop else comp.tokens)
        cut = min((text.find(s) for s in p.stop_strings if s in text), default=-1)
        comp.text = text[:cut] if cut >= 0 else text


class Batch:
    """The running batch of continuous batching: add() requests at any time, step() advances every
    running request by one token, cancel() drops one. See the module docstring for the API and how
    it works; Engine.generate is this driven to the end."""

    def __init__(self, engine: Engine, max_batch_size: int | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ChatforgeError(f"max_batch_size {max_batch_size} must be at least 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.feed: list[int] = []  # per running row: the token to feed at the next step
        self.logits = None  # (B, V) for the running rows, when they have been computed but not sampled
        self._ids = itertools.count()
        self.weights = None
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "steps": 0, "decode_tokens": 0,
                      "cache_positions": 0, "max_rows": 0}

    def __bool__(self) -> bool:
        """True while a request is waiting or running."""
        return bool(self.rows or self.waiting)

    def __len__(self) -> int:
        """Running rows (samples)."""
        return len(self.rows)

    def add(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
            _generator: torch.Generator | None = None, **kw) -> Request:
        """Queue a request (prompt token ids; SamplingParams, or its fields as keywords). It joins
        the batch at the next step() that has room for its n rows. Bad input raises ChatforgeError
        here, before anything runs."""
        eng = self.engine
        params = replace(params or SamplingParams(), **kw)
        eng.check_params(params)
        eng.check_prompt(prompt)
        if self.max_batch_size is not None and params.n > self.max_batch_size:
            raise ChatforgeError(f"n ({params.n}) is more than the batch holds ({self.max_batch_size})")
        rid = next(self._ids)
        prompt = [int(t) for t in prompt]
        req = Request(rid, prompt, params, [Completion(rid, j, len(prompt)) for j in range(params.n)])
        if _generator is not None:
            req.generator = _generator
        elif params.seed is not None:
            req.generator = torch.Generator(device=eng.device).manual_seed(params.seed)
        self.waiting.append(req)
        return req

    def cancel(self, request: Request) -> None:
        """Drop a waiting or running request now: its rows leave the batch and the KV cache, its
        completions keep what they have with finish_reason "cancelled". No-op once it is done."""
        if request.done:
            return
        if request.status == "waiting":
            self.waiting.remove(request)
        else:
            keep = [i for i, r in enumerate(self.rows) if r.request is not request]
            self._keep(keep)
        for c in request.completions:
            if not c.finish_reason:
                c.finish_reason = "cancelled"
        request.status = "cancelled"

    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Decode the running rows one step, admit what fits of the waiting requests, sample one
        token for every row, and return what happened (one Event per row)."""
        eng = self.engine
        if self.rows and self.logits is None:  # the tokens sampled last step go through the model
            if self.cache.pos + 1 > self.cache.max_len:  # out of slots: drop the padding every row has
                # (a running row always has room within the context, so after this there is a slot)
                self.cache.trim_left(0 if self.cache.pad is None else int(self.cache.pad.min()))
            x = torch.tensor(self.feed, dtype=torch.long, device=eng.device)[:, None]  # (B, 1)
            self.logits = eng.forward(x, self.cache, weights=self.weights)[:, -1, :]  # (B, V)
        self._admit()
        if not self.rows:
            return []
        logits, self.logits = self.logits, None
        sampled = self._sample(logits if logits.dtype == torch.float32 else logits.float())
        events, keep, feed = [], [], []
        for i, row in enumerate(self.rows):
            comp = row.comp
            forced = bool(row.forced)
            token = row.forced.popleft() if forced else sampled[i]
            comp.tokens.append(token)
            comp.mask.append(0 if forced else 1)
            reason, call = (None, None) if forced else eng._step_row(row, token)
            if reason is None and len(comp.tokens) >= row.cap:
                reason = "length"
            if reason is None:
                keep.append(i)
                feed.append(token)
            else:
                eng._finish(row, reason)
            events.append(Event(row.request, row.index, token, not forced, reason, call))
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(self.rows)
        self._keep(keep, feed)
        for ev in events:  # a request is finished when all its samples are
            req = ev.request
            if ev.finish_reason and req.status == "running" and all(c.finish_reason for c in req.completions):
                req.status = "finished"
        return events

    def _keep(self, keep: list[int], feed: list[int] | None = None) -> None:
        """Keep rows `keep` (indices into self.rows) in the batch and the cache."""
        if feed is None:
            feed = [self.feed[i] for i in keep] if self.feed else []
        if len(keep) < len(self.rows):
            if keep:
                self.cache.reorder(torch.tensor(keep, device=self.engine.device))
            else:
                self.cache = None  # nothing left: the next admission starts a fresh cache
            if self.logits is not None:
                self.logits = self.logits[keep] if keep else None
        self.rows = [self.rows[i] for i in keep]
        self.feed = feed
        # Slots every remaining row has as padding (the rows that had none have finished) are dead
        # weight: every decode step would attend over them. Drop them, so a batch that keeps admitting
        # requests keeps a cache as long as its oldest running row, not one that grows to the context.
        if self.cache is not None and self.cache.pad is not None:
            self.cache.trim_left(int(self.cache.pad.min()))  # (a no-op for 0)

    def _admit(self) -> None:
        """Prefill the waiting requests that fit (one left-padded forward) and merge them in."""
        eng, ctx = self.engine, self.engine.config.max_seq_len
        room = None if self.max_batch_size is None else self.max_batch_size - len(self.rows)
        take = []
        while self.waiting and (room is None or self.waiting[0].params.n <= room):
            req = self.waiting.popleft()
            take.append(req)
            if room is not None:
                room -= req.params.n
        if not take:
            return
        t0 = time.perf_counter()
        self.weights = eng.refresh_weights()
        P, T = len(take), max(len(r.prompt) for r in take)
        rows = []
        for r in take:
            p = r.params
            cap = min(p.max_tokens, ctx - len(r.prompt))  # a reply never runs past the context
            stop = frozenset(eng.default_stop if p.stop_tokens is None else p.stop_tokens)
            tools_on = (p.use_tools and eng.tools != {} and eng.tok is not None and bool(eng.tool_start)
                        and eng.output_start is not None)
            mask = eng.is_chat_prompt(r.prompt) if p.mask_control is None else p.mask_control
            rows += [_Row(r, j, cap, stop, tools_on, mask and eng.tok is not None) for j in range(p.n)]
            r.status = "running"
        # Slots the batch needs: every row can reach the current (or new prompts') last slot plus its
        # longest remaining reply; within the context (past it, trim_left makes room).
        start = T if self.cache is None else max(self.cache.pos, T)
        remaining = [row.cap - len(row.comp.tokens) for row in self.rows + rows]
        need = min(ctx, start + max(remaining))
        pad = torch.tensor([T - len(r.prompt) for r in take], dtype=torch.long, device=eng.device)  # (P,)
        idx = torch.zeros(P, T, dtype=torch.long, device=eng.device)  # (P, T), pad id 0 is masked out
        for i, r in enumerate(take):
            idx[i, T - len(r.prompt):] = torch.as_tensor(r.prompt, dtype=torch.long)
        c = eng.config
        cache = KVCache(P, c.n_layer, c.n_kv_head, c.head_dim, need if self.cache is None else T,
                        pad=pad if int(pad.max()) > 0 else None)
        logits = eng.forward(idx, cache, last_only=True, weights=self.weights)[:, -1, :]  # (P, V)
        fan = [i for i, r in enumerate(take) for _ in range(r.params.n)]
        if len(fan) > P:  # n samples per prompt share the prefill
            rep = torch.tensor(fan, device=eng.device)
            cache.reorder(rep)
            logits = logits[rep]
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            self.cache.merge(cache, need)
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        self.feed += [0] * len(rows)  # placeholders: the new rows are sampled before anything is fed
        self.stats["prefill_tokens"] += sum(len(r.prompt) for r in take)
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["cache_positions"] = max(self.stats["cache_positions"], self.cache.max_len)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))

    def _sample(self, logits) -> list[int]:
        """One token per row: the control-token mask, then each request's own settings. Rows of
        requests with the same settings and random stream are sampled in one call."""
        eng = self.engine
        groups: dict[tuple, list[int]] = {}
        bans: dict[int, list[int]] = {}
        for i, row in enumerate(self.rows):
            ids = eng.banned_ids(row)
            if ids is not None:
                bans.setdefault(id(ids), [ids]).append(i)
            p = row.request.params
            if p.frequency_penalty or p.presence_penalty:
                penalize(logits[i], row.comp.tokens, row.comp.mask, p.frequency_penalty, p.presence_penalty)
            greedy = p.temperature == 0
            key = (0.0, None, None, None) if greedy else (p.temperature, p.top_k, p.top_p, id(row.request.generator))
            groups.setdefault(key, []).append(i)
        for ids, *rows in bans.values():
            if len(rows) == len(self.rows):
                logits[:, ids] = float("-inf")
            else:
                logits[torch.tensor(rows, device=logits.device)[:, None], ids[None, :]] = float("-inf")
        if len(groups) == 1:
            [(key, rows)] = groups.items()
            gen = self.rows[rows[0]].request.generator
            return sample_next_token(logits, key[0], key[1], key[2], gen).tolist()
        out = [0] * len(self.rows)
        for (temperature, top_k, top_p, _), rows in groups.items():
            gen = self.rows[rows[0]].request.generator
            picked = sample_next_token(logits[rows], temperature, top_k, top_p, gen).tolist()
            for i, t in zip(rows, picked):
                out[i] = t
        return out
