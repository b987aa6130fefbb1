"""Shared builders for the engine, tools and chat tests: a small trained tokenizer, random-weight
models, a checkpoint folder, and a scripted model that emits a known token sequence."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from chatforge.model import GPT, ModelConfig

WORDS = ("the cat sat on a mat while six times seven is forty two and the answer to print "
         "python search output result compute number value tool call assistant user system "
         "capital of france paris london river mountain engine token cache batch").split()


def corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """Varied synthetic text with code-like lines, enough for a 512-token BPE."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        docs.append(f"{words}. print({rng.randint(0, 99)}*{rng.randint(0, 99)}) = {rng.randint(0, 9999)}\n"
                    f"def f{i}(x):\n    return x + {i}\n")
    return docs


def train_tokenizer(vocab_size: int = 512):
    from chatforge.tokenizer import Tokenizer

    return Tokenizer.train(corpus(), vocab_size=vocab_size)


def random_model(vocab_size: int = 512, seed: int = 0, **kw) -> GPT:
    """A small model with every weight random, see `randomize`."""
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                 max_seq_len=128), **kw})
    return randomize(GPT(cfg), seed)


def randomize(model: GPT, seed: int = 0) -> GPT:
    """Every weight random, norms included: the real init zeroes the output projections and the head,
    which would make every logit equal and hide weight-mapping mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def make_checkpoint(path: Path, tokenizer_dir: Path, vocab_size: int, **kw) -> Path:
    from chatforge.checkpoint import save_checkpoint

    return save_checkpoint(path, random_model(vocab_size, **kw), tokenizer_dir=tokenizer_dir)


class ScriptedModel(torch.nn.Module):
    """A fake model (batch 1) whose logits force `script`, one token per sampled step. Tokens the
    engine inserts between <|output_start|> and <|output_end|> do not advance the script, so after a
    tool call the script resumes where it stopped."""

    def __init__(self, script: list[int], vocab_size: int, out_start: int, out_end: int, max_seq_len: int = 256):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8,
                                  max_seq_len=max_seq_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.out_start, self.out_end = script, out_start, out_end
        self.fed: list[int] = []  # every token fed after the prompt, for assertions

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        if T > 1 or not hasattr(self, "k"):  # prefill
            self.k, self.in_output, self.fed = 0, False, []
        else:
            last = int(idx[0, -1])
            self.fed.append(last)
            if last == self.out_start:
                self.in_output = True
            elif last == self.out_end:
                self.in_output = False
            elif not self.in_output:
                self.k += 1
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        logits[:, -1, self.script[min(self.k, len(self.script) - 1)]] = 0.0
        return logits


class BiasedModel(torch.nn.Module):
    """A real model (KV cache, batching, padding all real) whose logits get `bias` (V,) added: a
    large bias on some tokens makes them the model's favourites whatever the context."""

    def __init__(self, model: GPT, bias: torch.Tensor):
        super().__init__()
        self.model, self.config, self.bias = model, model.config, bias

    def forward(self, idx, kv_cache=None, last_only=False):
        return self.model(idx, kv_cache=kv_cache, last_only=last_only) + self.bias


def greedy_reference(model, prompt: list[int], max_tokens: int, stop=(), tool=None, max_seq_len=None):
    """Greedy reply by full recomputation (GPT.forward over the whole sequence every step: no KV
    cache, no padding, no batch), the reference the engine is checked against. tool: None, or
    (start id, end id, out_start id, out_end id, output token ids): after the model writes the end
    token of an open call, the output block is appended token by token, as the engine does."""
    ids, out, forced, in_call = list(prompt), [], [], False
    limit = max_seq_len or model.config.max_seq_len
    with torch.no_grad():
        while len(out) < max_tokens and len(ids) < limit:
            if forced:
                t = forced.pop(0)
            else:
                t = int(model(torch.tensor([ids]))[0, -1].argmax())
                if t in stop:
                    out.append(t)
                    break
                if tool is not None and t == tool[0] and not in_call:
                    in_call = True
                elif tool is not None and t == tool[1] and in_call:
                    forced, in_call = [tool[2], *tool[4], tool[3]], False
            out.append(t)
            ids.append(t)
    return out
