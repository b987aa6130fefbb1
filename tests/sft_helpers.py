"""Shared builders for the SFT library tests: a small tokenizer trained on real text (cached per
process), the same tokenizer's Hugging Face export, and one-thread torch for tiny models."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch


@functools.lru_cache(maxsize=None)
def real_tokenizer(data: str):
    """A 1024-token BPE with chatforge's special tokens, trained on Wikipedia text and GSM8K."""
    from chatforge.corpus import iter_documents
    from chatforge.tokenizer import Tokenizer

    docs = iter_documents([str(Path(data) / "text/wiki_demo.txt"), str(Path(data) / "math/gsm8k/train.jsonl")],
                          max_chars=600_000)
    return Tokenizer.train(docs, vocab_size=1024)


@functools.lru_cache(maxsize=None)
def hf_tokenizer(data: str, folder: str):
    """transformers' AutoTokenizer over real_tokenizer's HF export (chat template included)."""
    from transformers import AutoTokenizer

    real_tokenizer(data).export_hf(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest, and on a shared 2-core machine two threads spin (the
    LoRA training test took 20x longer). Import this fixture into a test module to use it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
