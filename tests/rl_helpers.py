"""Shared by the GRPO and PPO tests: a task whose rule is known, and a small random GPT that samples
varied replies."""

from __future__ import annotations

import re

import torch

from chatforge.model import GPT, ModelConfig
from chatforge.tasks.rl import RLItem, RLTask

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "green", "candle", "mirror", "forest",
         "ocean", "window", "garden", "planet", "rocket"]


def digit_task() -> RLTask:
    """A rule with a known answer: a reply earns 1 when the model's own text holds a digit."""
    def load(split, data_dir, n, seed):
        words = WORDS[:12] if split == "train" else WORDS[12:]
        return [RLItem(f"{split}/{w}", [{"role": "user", "content": f"Say something about {w}."}], "digit")
                for w in words]
    return RLTask("digit", load, extract=lambda r: r, check=lambda r, a: bool(re.search(r"\d", r)))


def small_gpt(vocab: int, seed: int = 0, depth: int = 1, width: int = 64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=depth, n_head=2, n_kv_head=2, n_embd=width, max_seq_len=128))
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # the real init zeroes the head: every reply alike
    return model
