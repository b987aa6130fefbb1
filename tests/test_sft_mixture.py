"""The SFT mixture (chatforge/tasks/mixture.py): weights and per-source counts, truncation and skips,
padding that computes exactly what a conversation computes alone, packing with a block-diagonal mask
that does too, a resumable rank-sharded loader, and experience replay."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from chatforge.common import ChatforgeError
from chatforge.model import GPT, ModelConfig
from chatforge.tasks.conversations import (SourceStats, bfcl_conversations, glaive_conversations,
                                           gsm8k_tool_conversations, oasst_conversations, self_instruct_conversations)
from chatforge.tasks.identity import IdentityCard, identity_conversations
from chatforge.tasks.mixture import (ConversationLoader, ReplayLoader, Rendered, Source, build_mixture,
                                     document_causal_mask, iter_conversation_batches, mixture_metrics, pack_rows,
                                     pad_rows, render_mixture)
from chatforge.tasks.synthetic import synthetic_conversations
from engine_helpers import randomize  # tests/engine_helpers.py
from sft_helpers import one_thread, real_tokenizer  # noqa: F401  (one_thread: autouse fixture)


def conv(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def test_weights_repeat_or_subsample_and_are_counted():
    a, b, c = [conv(i) for i in range(10)], [conv(100 + i) for i in range(8)], [conv(200)]
    stats = SourceStats("b", records=9, conversations=8)
    stats.skip("empty_turn")
    items, counts = build_mixture([Source("a", a, 2.0), Source("b", lambda: iter(b), 0.5, stats), Source("c", c, 0)], seed=1)
    n = Counter(name for name, _ in items)
    assert n == Counter({"a": 20, "b": 4})
    assert sorted(m[0]["content"] for name, m in items if name == "a") == sorted([x[0]["content"] for x in a] * 2)
    assert counts["b"]["source"] == {"records": 9, "conversations": 8, "other_split": 0, "skipped": {"empty_turn": 1}}
    assert (counts["a"]["used"], counts["b"]["used"], counts["c"]["used"]) == (20, 4, 0)
    assert items == build_mixture([Source("a", a, 2.0), Source("b", b, 0.5), Source("c", c, 0)], seed=1)[0]
    assert [x[0] for x in items] != [x[0] for x in build_mixture([Source("a", a, 2.0), Source("b", b, 0.5)], seed=2)[0]]
    with pytest.raises(ChatforgeError, match="weight -1"):
        build_mixture([Source("a", a, -1)])
    with pytest.raises(ChatforgeError, match="unique"):
        build_mixture([Source("a", a), Source("a", b)])


def test_render_counts_truncation_drops_and_bad_conversations(shared_data):
    tok = real_tokenizer(str(shared_data))
    oasst = list(oasst_conversations(split="val"))
    bad = [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]]
    items, counts = build_mixture([Source("oasst", oasst), Source("bad", bad)])
    rendered_ = [tok.render_conversation(c) for c in oasst]
    lengths = [len(ids) for ids, _ in rendered_]
    rows = render_mixture(tok, items, max_tokens=128, counts=counts)
    long = sum(n > 128 for n in lengths)
    # a prompt longer than the row leaves nothing to train on: that one is dropped, the rest cut
    lost = sum(n > 128 and not any(mask[1:128]) for n, (_, mask) in zip(lengths, rendered_))
    assert long > 2 and lost == 1 and len(rows) == len(oasst) - lost and all(len(r.ids) <= 128 for r in rows)
    assert counts["oasst"]["skipped"] == Counter({"too_long_truncated": long - lost, "too_long_dropped": lost})
    assert counts["bad"]["skipped"] == Counter({"consecutive_assistant": 1})
    assert counts["oasst"]["tokens"] == sum(len(r.ids) for r in rows) == sum(
        min(n, 128) for n, (_, mask) in zip(lengths, rendered_) if n <= 128 or any(mask[1:128]))
    assert counts["oasst"]["trained_tokens"] == sum(int(r.mask[1:].sum()) for r in rows)
    dropped = {}
    assert len(render_mixture(tok, items, max_tokens=128, overflow="drop", counts=dropped)) == len(oasst) - long
    assert dropped["oasst"]["skipped"] == Counter({"too_long_dropped": long})
    # a conversation cut before its first assistant token has nothing to train on: dropped, not kept
    first_reply = rendered_[0][1].index(1)
    cut = {}
    assert render_mixture(tok, [("o", oasst[0])], max_tokens=first_reply, counts=cut) == []
    assert cut["o"]["skipped"] == Counter({"too_long_dropped": 1})
    # a tokenizer without the function pair cannot render function calls: counted, not crashed
    from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer

    old = Tokenizer(tok.mergeable_ranks, tok.pattern, {s: len(tok.mergeable_ranks) + i for i, s in enumerate(SPECIAL_TOKENS[:13])})
    glaive = [c for c in glaive_conversations(split="val") if c[0]["role"] == "system"][:3]
    old_counts = {}
    assert render_mixture(old, [("g", c) for c in glaive], 4096, counts=old_counts) == []
    assert old_counts["g"]["skipped"] == Counter({"render_error": 3})
    assert mixture_metrics(old_counts) == {"g": {"skipped": {"render_error": 3}, "tokens": 0, "trained_tokens": 0}}


def small_gpt(vocab: int) -> GPT:
    return randomize(GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=1024)), 0)


def test_padding_computes_what_each_conversation_computes_alone(shared_data):
    tok = real_tokenizer(str(shared_data))
    convs = list(synthetic_conversations(n=2, split="val")) + list(self_instruct_conversations(split="val"))[:2]
    rows = render_mixture(tok, [("s", c) for c in convs], max_tokens=200)
    model = small_gpt(tok.vocab_size)
    x, y = pad_rows(rows, 199)
    assert x.shape == (len(rows), 199)
    with torch.no_grad():
        padded = model(x, y, loss_reduction="none")  # (B, T), 0 where the target is -1
        for b, r in enumerate(rows):
            ids = torch.tensor(r.ids, dtype=torch.long)[None]
            alone = model(ids[:, :-1], ids[:, 1:], loss_reduction="none")[0]  # every position
            keep = torch.tensor(r.mask[1:], dtype=torch.bool)
            n = len(r.ids) - 1
            assert torch.allclose(padded[b, :n][keep], alone[keep], atol=1e-5)
            assert (y[b, :n][keep] == ids[0, 1:][keep]).all() and (y[b, :n][~keep] == -1).all() and (y[b, n:] == -1).all()


def test_packed_rows_with_the_document_mask_compute_each_conversation_alone(shared_data):
    """pack_rows + document_causal_mask give each packed conversation the logits it has alone (RoPE
    depends only on relative positions), through the model's own blocks with an explicit mask."""
    tok = real_tokenizer(str(shared_data))
    rows = render_mixture(tok, [("s", c) for c in synthetic_conversations(n=2, split="val")], max_tokens=120)
    x, y, doc = pack_rows(rows, 255)
    assert x.shape[1] == 255 and int(doc.max()) >= 2  # several conversations per row
    model = small_gpt(tok.vocab_size).eval()

    def forward(idx, mask):  # GPT.forward's math, with the mask handed to every block
        B, T = idx.shape
        h = model.wte(idx).view(B * T, -1)  # (B*T, C): the model's 2-D residual stream
        cos, sin = model.cos[:T, None], model.sin[:T, None]  # (T, 1, D)
        for block in model.blocks:
            h = block(h, B, T, cos, sin, None, mask)
        return model.lm_head(model.norm_f(h)).view(B, T, -1)

    with torch.no_grad():
        packed = forward(x, document_causal_mask(doc))  # (R, T, V)
        at = 0
        for r in rows[:int(doc[0].max()) + 1]:  # the first packed row holds these, one after another
            n = len(r.ids)
            alone = model(torch.tensor(r.ids[:n - 1], dtype=torch.long)[None])[0]  # (n-1, V)
            assert torch.allclose(packed[0, at:at + n - 1], alone, atol=1e-4)
            assert (doc[0, at:at + n - 1] == doc[0, at]).all()
            at += n
        unmasked = forward(x, None)  # plain causal attention leaks across conversations
        assert not torch.allclose(unmasked[0, len(rows[0].ids):len(rows[0].ids) + 5],
                                  packed[0, len(rows[0].ids):len(rows[0].ids) + 5], atol=1e-3)


def rendered(n: int, seed: int = 0) -> list[Rendered]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(4, 20))
        ids = np.concatenate([[0], np.full(L - 1, i + 1)]).astype(np.int32)  # row i is made of id i+1
        mask = np.concatenate([[0, 0], np.ones(L - 2)]).astype(np.uint8)
        out.append(Rendered(ids, mask, "s"))
    return out


def first_ids(x: torch.Tensor) -> list[int]:
    return x[:, 1].tolist()  # which conversation each row holds


def test_loader_epochs_ranks_and_exact_resume():
    rows = rendered(23)
    one = ConversationLoader(rows, batch_size=4, seq_len=32, grad_accum=2, seed=5)
    seen = [i for _ in range(len(one) * 2) for i in first_ids(one.next_batch()[0])]
    assert len(seen) == 16 and len(set(seen)) == 16  # each conversation at most once per epoch
    x, y = one.next_batch()  # the ragged tail (7 rows) is dropped: a new epoch starts
    assert one.epoch == 1 and x.shape == (4, max(len(rows[i - 1].ids) for i in first_ids(x)) - 1)
    # two ranks of batch 2 see exactly the rows one process sees with batch 4
    a = ConversationLoader(rows, batch_size=4, seq_len=32, seed=5)
    r0, r1 = (ConversationLoader(rows, batch_size=2, seq_len=32, seed=5, rank=r, world_size=2) for r in (0, 1))
    for _ in range(9):
        assert first_ids(a.next_batch()[0]) == first_ids(r0.next_batch()[0]) + first_ids(r1.next_batch()[0])
    # resume: a fresh loader with the saved state continues with the same batches
    b = ConversationLoader(rows, batch_size=4, seq_len=32, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(7):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    fixed = ConversationLoader(rows, batch_size=4, seq_len=32, pad_to="max").next_batch()[0]
    assert fixed.shape == (4, 32)
    with pytest.raises(ChatforgeError, match="keep the batch size"):
        ConversationLoader(rows, batch_size=2, seq_len=32).load_state_dict(a.state_dict())
    with pytest.raises(ChatforgeError, match="fewer than one optimizer step"):
        ConversationLoader(rows[:3], batch_size=4, seq_len=32)
    x, y, d = ConversationLoader(rows, batch_size=2, seq_len=40, packing="pack").next_batch()
    assert x.shape == y.shape == d.shape == (2, 40) and int(d.max()) >= 1


def test_group_by_length_pads_less_visits_every_row_and_resumes():
    """Length-grouped micro-batches: each epoch still visits every conversation once (bar the ragged
    tail), padding shrinks, the order is seeded (two ranks and a resumed loader agree), and the
    micro-batch order is still shuffled (not sorted by length)."""
    rows = rendered(300, seed=1)

    def epoch(loader):
        batches = [loader.next_batch()[0] for _ in range(len(loader))]
        return batches, [i for x in batches for i in first_ids(x)]

    plain, plain_seen = epoch(ConversationLoader(rows, batch_size=4, seq_len=32, seed=3))
    grouped, seen = epoch(ConversationLoader(rows, batch_size=4, seq_len=32, seed=3, group_by_length=True))
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 300  # each once (300 = 75 full micro-batches)
    padded = lambda batches: sum(x.numel() for x in batches)  # noqa: E731
    real = sum(len(r.ids) - 1 for r in rows)
    assert padded(grouped) < 1.2 * real < padded(plain)
    widths = [x.shape[1] for x in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    # ranks and resume see the same grouped order
    a = ConversationLoader(rows, batch_size=4, seq_len=32, seed=3, group_by_length=True)
    r0, r1 = (ConversationLoader(rows, batch_size=2, seq_len=32, seed=3, rank=r, world_size=2, group_by_length=True)
              for r in (0, 1))
    for _ in range(5):
        assert first_ids(a.next_batch()[0]) == first_ids(r0.next_batch()[0]) + first_ids(r1.next_batch()[0])
    b = ConversationLoader(rows, batch_size=4, seq_len=32, seed=3, group_by_length=True)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next_batch()[0], b.next_batch()[0]) for _ in range(80))  # across the epoch end
    with pytest.raises(ChatforgeError, match="group_by_length"):
        ConversationLoader(rows, batch_size=4, seq_len=32).load_state_dict(a.state_dict())


def test_replay_mixes_pretraining_rows_and_resumes(shared_data):
    from chatforge.dataloader import PackedLoader, TokenStream

    tok = real_tokenizer(str(shared_data))
    text = (shared_data / "text/wiki_demo.txt").read_text()[:200_000]
    stream = TokenStream.from_array(np.array(tok.encode(text, bos=True)), tok.vocab_size)
    rows = render_mixture(tok, [("s", c) for c in synthetic_conversations(n=20, split="train")], max_tokens=65)

    def make():
        return ReplayLoader(ConversationLoader(rows, batch_size=3, seq_len=64, seed=1),
                            PackedLoader(stream, batch_size=1, seq_len=64, seed=1))

    mix = make()
    x, y = mix.next_batch()
    assert x.shape == y.shape == (4, 64)
    assert (y[3] != -1).all()  # a replayed pretraining row trains on every token
    assert (y[:3] == -1).any()  # SFT rows only on the assistant's tokens
    other = make()
    other.load_state_dict(mix.state_dict())
    for _ in range(5):
        assert all(torch.equal(p, q) for p, q in zip(mix.next_batch(), other.next_batch()))


def test_the_whole_mixture_from_real_sources(shared_data):
    """Every source through build_mixture and render_mixture with per-source counts, and validation
    batches whose per-token loss is the mean over trained tokens."""
    tok = real_tokenizer(str(shared_data))
    stats = {n: SourceStats(n) for n in ("oasst", "self_instruct", "glaive", "bfcl", "gsm8k")}
    sources = [
        Source("oasst", lambda: oasst_conversations(stats=stats["oasst"]), 1.0, stats["oasst"]),
        Source("self_instruct", lambda: self_instruct_conversations(stats=stats["self_instruct"]), 0.5, stats["self_instruct"]),
        Source("glaive", lambda: glaive_conversations(stats=stats["glaive"]), 1.0, stats["glaive"]),
        Source("bfcl", lambda: bfcl_conversations(stats=stats["bfcl"], compact_tools=True), 1.0, stats["bfcl"]),
        Source("gsm8k", lambda: list(gsm8k_tool_conversations(stats=stats["gsm8k"]))[:300], 1.0, stats["gsm8k"]),
        Source("synthetic", lambda: synthetic_conversations(n=40), 1.0),
        Source("identity", lambda: identity_conversations(IdentityCard(), 100, data_dir=str(shared_data)), 2.0),
    ]
    items, counts = build_mixture(sources, seed=0)
    rows = render_mixture(tok, items, max_tokens=1025, counts=counts)  # function schemas need > 256 tokens
    m = mixture_metrics(counts)
    assert set(m) == {s.name for s in sources}
    for name, c in m.items():
        assert c["used"] > 0 and c["trained_tokens"] > 0, name
        assert c["used"] == len([r for r in rows if r.source == name]) + sum(
            v for k, v in c["skipped"].items() if k != "too_long_truncated"), name
    assert m["identity"]["used"] == 200 and m["synthetic"]["used"] == 200
    assert m["oasst"]["source"]["records"] == 100 and m["oasst"]["skipped"]["too_long_truncated"] > 0
    model = small_gpt(tok.vocab_size)
    total = count = 0.0
    with torch.no_grad():
        for x, y in iter_conversation_batches(rows[:40], batch_size=8, seq_len=1024):
            total += model(x, y, loss_reduction="sum").item()
            count += (y != -1).sum().item()
        mean = model(*pad_rows(rows[:40], 1024)).item()  # one batch, mean over trained targets
    assert total / count == pytest.approx(mean, rel=1e-4)
