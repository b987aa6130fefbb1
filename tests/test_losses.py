"""SFT building blocks (chatforge/losses.py) on small tensors against values computed by hand, and
against the model's own cross-entropy on real text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge.losses import (compute_entropy, get_response_log_probs, masked_mean, masked_normalize,
                              sft_microbatch_train_step, tokenize_prompt_and_output)
from sft_helpers import one_thread  # noqa: F401  (autouse fixture)


class Ids:
    """A tokenizer whose "text" is already ids: "5 6" -> [5, 6]."""

    def encode(self, s):
        return [int(x) for x in s.split()]


def test_tokenize_prompt_and_output_by_hand():
    out = tokenize_prompt_and_output(["5 6", "1"], ["7 8 9", "2 3"], Ids())
    # ids: [5 6 7 8 9] and [1 2 3 pad pad]; shift by one; the mask marks labels that are output tokens
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 0]]
    assert out["labels"].tolist() == [[6, 7, 8, 9], [2, 3, 0, 0]]
    assert out["response_mask"].tolist() == [[False, True, True, True], [True, True, False, False]]
    # lists of ids pass through; pad_id is honoured
    out = tokenize_prompt_and_output([[5, 6]], [[7]], Ids(), pad_id=99)
    assert out["input_ids"].tolist() == [[5, 6]] and out["labels"].tolist() == [[6, 7]]
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["1", "2"], ["3"], Ids())


def test_tokenize_real_text_with_gpt2(shared_data):
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(shared_data / "tokenizers/gpt2")
    rec = json.loads((shared_data / "math/gsm8k/train.jsonl").read_text().splitlines()[0])
    q, a = "Question: " + rec["question"] + "\nAnswer:", " " + rec["answer"]
    out = tokenize_prompt_and_output([q], [a], tok)
    ids = tok.encode(q) + tok.encode(a)
    assert out["input_ids"][0].tolist() == ids[:-1] and out["labels"][0].tolist() == ids[1:]
    # the masked-in labels decode to exactly the answer
    labels = out["labels"][0][out["response_mask"][0]].tolist()
    assert tok.decode(labels) == a


def test_compute_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]])
    h = compute_entropy(logits)
    # uniform over 4: log 4; p = (3/4, 1/4): -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    assert h.tolist() == pytest.approx([math.log(4), 0.562335], abs=1e-5)
    # huge logits stay finite (no exp overflow)
    assert torch.isfinite(compute_entropy(torch.tensor([[1e4, 0.0, -1e4]]))).all()


class Bigram(torch.nn.Module):
    """logits at position t depend only on input t: a lookup table (V, V)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table))

    def forward(self, idx):
        return self.table[idx]  # (B, T, V)


def test_get_response_log_probs_by_hand():
    l = math.log
    model = Bigram([[0.0, 0.0, 0.0], [l(1), l(2), l(1)], [l(1), l(1), l(8)]])  # rows: uniform, (.25 .5 .25), (.1 .1 .8)
    input_ids = torch.tensor([[0, 1, 2]])
    labels = torch.tensor([[2, 1, 2]])
    out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
    assert out["log_probs"][0].tolist() == pytest.approx([l(1 / 3), l(0.5), l(0.8)], abs=1e-6)
    h = [l(3), -(0.25 * l(0.25) * 2 + 0.5 * l(0.5)), -(0.1 * l(0.1) * 2 + 0.8 * l(0.8))]
    assert out["token_entropy"][0].tolist() == pytest.approx(h, abs=1e-6)
    # ignored labels (-1) do not crash the gather
    assert get_response_log_probs(model, input_ids, torch.tensor([[-1, 1, 2]]))["log_probs"].shape == (1, 3)


def test_log_probs_agree_with_the_models_cross_entropy(shared_data):
    from chatforge.model import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, max_seq_len=64))
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # a zero head would give uniform log-probs
    data = (shared_data / "text/wiki_demo.txt").read_bytes()[:2 * 33]
    ids = torch.tensor(list(data[:66]), dtype=torch.long).view(2, 33)
    x, y = ids[:, :-1], ids[:, 1:]
    lp = get_response_log_probs(model, x, y)["log_probs"]
    assert torch.allclose(lp, -model(x, y, loss_reduction="none"), atol=1e-5)


def test_masked_mean_and_normalize_by_hand():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert masked_mean(t, m).item() == pytest.approx((1 + 3 + 6) / 3)
    assert masked_mean(t, m, dim=-1).tolist() == pytest.approx([2.0, 6.0])
    assert masked_mean(t, m, dim=0).tolist()[0] == 1.0 and math.isnan(masked_mean(t, m, dim=0).tolist()[1])
    assert masked_normalize(t, m, 4.0).item() == pytest.approx(10 / 4)
    assert masked_normalize(t, m, 2.0, dim=-1).tolist() == pytest.approx([2.0, 3.0])
    assert masked_normalize(t, m, 1.0, dim=0).tolist() == pytest.approx([1.0, 0.0, 9.0])


def test_sft_microbatch_step_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    # per token: (1 + 2 + 5 + 6) / 4 = 3.5, / 2 accumulation steps = 1.75; d loss / d lp = -m / 4 / 2
    loss, meta = sft_microbatch_train_step(lp, m, gradient_accumulation_steps=2)
    assert loss.item() == pytest.approx(1.75) and meta["nll"].item() == pytest.approx(3.5)
    assert meta["response_tokens"].item() == 4 and meta["mean_log_prob"].item() == pytest.approx(-3.5)
    assert torch.allclose(lp.grad, -m / 8)
    # by a constant c = 2: rows sum to 3 and 11 -> 1.5 and 5.5, mean 3.5, / 4 steps; grad -m / c / B / G
    lp.grad = None
    loss, _ = sft_microbatch_train_step(lp, m, gradient_accumulation_steps=4, normalize_constant=2.0)
    assert loss.item() == pytest.approx(3.5 / 4)
    assert torch.allclose(lp.grad, -m / (2 * 2 * 4))
    loss, _ = sft_microbatch_train_step(lp.detach(), m, 1, backward=False)
    assert loss.item() == pytest.approx(3.5)


def test_constant_normalization_gives_an_exact_token_mean_across_micro_batches():
    """Two micro-batches with 3 and 1 response tokens: c = N / (B * G) makes the accumulated gradient
    the gradient of the mean over all 4 tokens; the per-token mode weighs the micro-batches equally."""
    torch.manual_seed(0)
    full = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 1]])
    ref = torch.autograd.grad(masked_mean(-full, mask), full)[0]
    lp = full.detach().clone().requires_grad_(True)
    c = mask.sum().item() / (1 * 2)
    for row in range(2):
        sft_microbatch_train_step(lp[row:row + 1], mask[row:row + 1], 2, normalize_constant=c)
    assert torch.allclose(lp.grad, ref)
    lp.grad = None
    for row in range(2):
        sft_microbatch_train_step(lp[row:row + 1], mask[row:row + 1], 2)
    assert not torch.allclose(lp.grad, ref)  # token 4 alone weighs as much as tokens 1-3 together
    assert lp.grad[1, 3].item() == pytest.approx(-0.5)


def test_sft_steps_fit_a_real_answer(shared_data):
    """A few optimizer steps of the building blocks on one GSM8K answer raise its log-likelihood, and the
    prompt tokens (mask 0) get no gradient pull of their own."""
    from chatforge.model import GPT, ModelConfig
    from chatforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.load(shared_data / "tokenizers/gpt2")
    rec = json.loads((shared_data / "math/gsm8k/train.jsonl").read_text().splitlines()[1])
    batch = tokenize_prompt_and_output([rec["question"]], [" " + rec["answer"]], tok)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        lp = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        _, meta = sft_microbatch_train_step(lp, batch["response_mask"], 1)
        first = meta["nll"].item() if first is None else first
        opt.step()
        opt.zero_grad()
    assert first == pytest.approx(math.log(tok.vocab_size), rel=1e-3)  # zero-init head: uniform at step 0
    last = sft_microbatch_train_step(
        get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"],
        batch["response_mask"], 1, backward=False)[1]["nll"].item()
    assert last < first - 1.0
