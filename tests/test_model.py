"""Model, checkpoint and Hugging Face export. The reference is transformers' Qwen3ForCausalLM:
our export must load there and give the same logits and the same greedy tokens."""

import json
import math
import os
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import chatforge.checkpoint as ckpt
from chatforge.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from chatforge.common import ChatforgeError
from chatforge.export import NAME_TABLE, export_hf, from_hf_name, to_hf_name
from chatforge.model import GPT, KVCache, ModelConfig
from engine_helpers import randomize  # tests/engine_helpers.py

torch.set_num_threads(1)  # tiny models: one thread is as fast, and a busy machine does not stall it


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model with every weight random (engine_helpers.randomize)."""
    return randomize(GPT(cfg), seed)


def greedy_no_cache(model, idx, n):
    """Reference decoder: re-run the full sequence every step, no cache."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(idx)[:, -1, :].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


def greedy_cached(model, idx, n):
    """Greedy tokens (B, n) from the engine (KV cache; on CPU the inference weights)."""
    from chatforge.engine import Engine

    return torch.tensor([c.tokens for c in Engine(model).generate(idx.tolist(), max_tokens=n, temperature=0)])


# ----------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("kw", [
    dict(n_kv_head=2),  # GQA, untied
    dict(n_kv_head=4, tie_embeddings=True, rope_theta=500000.0),  # MHA, tied head, non-default theta
    dict(n_kv_head=1, head_dim=32, intermediate_size=96),  # MQA, head_dim != n_embd / n_head
], ids=["gqa", "tied", "mqa-wide-heads"])
def test_export_matches_transformers(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    cfg = tiny(**kw)
    model = random_model(cfg)
    save_checkpoint(tmp_path / "ckpt", model)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")

    hf, loading = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32)
    hf.eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    torch.manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (2, 40, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = idx[:, :7]
    hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                            do_sample=False, pad_token_id=0, eos_token_id=None)[:, 7:]
    assert torch.equal(greedy_cached(model, prompt, 20), hf_tokens)


def test_name_table_round_trips_every_parameter():
    model = GPT(tiny(n_layer=3))
    names = list(model.state_dict())
    hf_names = [to_hf_name(n) for n in names]
    assert len(set(hf_names)) == len(names)
    assert [from_hf_name(n) for n in hf_names] == names
    assert "model.layers.2.self_attn.k_norm.weight" in hf_names
    assert len(NAME_TABLE) == len({ours for ours, _ in NAME_TABLE})
    with pytest.raises(KeyError):
        to_hf_name("blocks.0.attn.c_x.weight")


def test_export_writes_tokenizer_and_special_ids(tmp_path, monkeypatch):
    """export_hf hands the checkpoint's tokenizer folder to the tokenizer's own HF export and
    records its ids (a stand-in tokenizer module, so this test does not depend on tokenizer.py)."""
    calls = {}

    class FakeTokenizer:
        bos_id, special_tokens = 7, {"<|bos|>": 7, "<|assistant_end|>": 9}

        @classmethod
        def load(cls, d):
            calls["load"] = Path(d)
            return cls()

        def export_hf(self, d):
            calls["export"] = Path(d)
            (Path(d) / "tokenizer.json").write_text("{}")

    monkeypatch.setitem(sys.modules, "chatforge.tokenizer", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "vocab.bin").write_bytes(b"\x00\x01")
    save_checkpoint(tmp_path / "ckpt", GPT(tiny()), tokenizer_dir=tok_dir)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    # the export is written into a sibling temp folder, then renamed to `out` (export.py)
    assert calls["load"] == tmp_path / "ckpt" / "tokenizer" and calls["export"].parent == out.parent
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (7, [9, 7])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [9, 7]
    assert (out / "tokenizer.json").exists()


def test_export_with_real_tokenizer_loads_in_transformers(tmp_path):
    """The whole folder -- weights, config and the tokenizer's own HF export -- works in transformers."""
    transformers = pytest.importorskip("transformers")
    Tokenizer = pytest.importorskip("chatforge.tokenizer").Tokenizer
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(40)]
    tok = Tokenizer.train(texts, vocab_size=512)
    tok.save(tmp_path / "tok")
    cfg = tiny(vocab_size=tok.vocab_size)
    model = random_model(cfg, seed=2)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tmp_path / "tok")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = texts[0][:80]
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(text, bos=True)  # documents start with <|bos|> (tests/test_export.py)
    assert hf.config.bos_token_id == tok.bos_id
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[:, ids.size(1):]
    assert new.tolist() == greedy_cached(model, ids, 8)[:, :new.size(1)].tolist()


# ----------------------------------------------------------------------------------------------
# KV cache


def test_kv_cache_matches_full_forward_batch2():
    cfg = tiny()
    model = random_model(cfg, seed=3)
    torch.manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6))
    n = 25
    ref = greedy_no_cache(model, prompt, n)
    assert torch.equal(greedy_cached(model, prompt, n), ref[:, 6:])

    # logits at every decode step equal the last-position logits of a full forward pass
    cache = KVCache(2, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, ref.size(1))
    with torch.no_grad():
        step_logits = [model(ref[:, :6], kv_cache=cache)[:, -1]]
        for t in range(6, ref.size(1) - 1):
            step_logits.append(model(ref[:, t:t + 1], kv_cache=cache)[:, -1])
        full = model(ref[:, :-1])[:, 5:]  # (B, n, V)
    assert cache.pos == ref.size(1) - 1
    assert torch.allclose(torch.stack(step_logits, dim=1), full, atol=1e-5)


def test_kv_cache_chunked_prefill():
    """Several tokens at once after the cache is non-empty (the explicit-mask path)."""
    cfg = tiny()
    model = random_model(cfg, seed=4)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    cache = KVCache(2, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 20)
    with torch.no_grad():
        a = model(idx[:, :8], kv_cache=cache)
        b = model(idx[:, 8:15], kv_cache=cache)
        c = model(idx[:, 15:], kv_cache=cache)
        full = model(idx)
    assert torch.allclose(torch.cat([a, b, c], dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4, tie_embeddings=True), dict(n_kv_head=1, head_dim=32)],
                         ids=["gqa", "mha-tied", "mqa-wide-heads"])
def test_inference_weights_compute_the_model(kw):
    """The inference layout (transposed, packed copies; the engine's CPU path) gives the logits of
    the module path and of a full forward without cache: ragged prefill, decode steps (1 and 5 rows:
    the head switches layout at 4), a chunk after the cache is filled."""
    model = random_model(tiny(**kw), seed=3)
    c = model.config
    w = model.inference_weights()
    for B in (1, 5):
        seq = torch.randint(0, c.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B))
        pad = torch.tensor([0, 4, 7, 1, 3][:B]) if B > 1 else None
        for weights in (w, None):
            cache = KVCache(B, c.n_layer, c.n_kv_head, c.head_dim, 16, pad=pad)
            with torch.no_grad():
                got = [model(seq[:, :9], kv_cache=cache, weights=weights)]  # (B, 9, V)
                got += [model(seq[:, t:t + 1], kv_cache=cache, weights=weights) for t in range(9, 12)]
                got += [model(seq[:, 12:], kv_cache=cache, weights=weights)]  # (B, 4, V)
            logits = torch.cat(got, dim=1)  # (B, 16, V)
            for b in range(B):  # reference: row b alone, without its padding, no cache
                p = 0 if pad is None else int(pad[b])
                with torch.no_grad():
                    ref = model(seq[b:b + 1, p:])[0]  # (16-p, V)
                torch.testing.assert_close(logits[b, p:], ref, rtol=1e-4, atol=1e-4)
    assert model.inference_weights(w) is w  # unchanged weights: the same copy
    with torch.no_grad():
        model.blocks[0].mlp.c_up.weight.mul_(2.0)  # an in-place update (an optimizer step)
    w2 = model.inference_weights(w)
    assert w2 is not w and torch.equal(w2.layers[0].gate_up[:, c.intermediate_size:], model.blocks[0].mlp.c_up.weight.t())


def test_autocast_keeps_q_k_and_cache_in_bf16():
    """Under bf16 autocast a float32 RMSNorm weight must not promote its bf16 input: QK-norm output,
    the cached keys and the values are all bf16 (before the fix keys were float32, values bf16)."""
    model = random_model(tiny(), seed=5)
    c = model.config
    idx = torch.randint(0, c.vocab_size, (2, 10))
    cache = KVCache(2, c.n_layer, c.n_kv_head, c.head_dim, 12, pad=torch.tensor([0, 3]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.blocks[0].attn.q_norm(torch.randn(2, 3, 4, 16, dtype=torch.bfloat16))
        logits = model(idx, kv_cache=cache)
        step = model(idx[:, -1:], kv_cache=cache)
    assert q.dtype == torch.bfloat16
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert logits.dtype == step.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model(idx[:1])  # row 0 is unpadded
    assert (logits[0].float() - ref[0]).abs().max() < 0.1 * ref.abs().max()  # bf16 close to float32


def test_kv_cache_merge_and_trim_left():
    """Continuous batching's cache moves: two sequences prefilled apart (different lengths), merged
    (the shorter one shifted right), decoded together, their common padding trimmed, decoded on:
    every logit equals a full forward of that sequence alone."""
    model = random_model(tiny(), seed=6)
    c = model.config
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, c.vocab_size, (1, 20), generator=g), torch.randint(0, c.vocab_size, (2, 14), generator=g)
    ca = KVCache(1, c.n_layer, c.n_kv_head, c.head_dim, 8)
    cb = KVCache(2, c.n_layer, c.n_kv_head, c.head_dim, 12, pad=torch.tensor([0, 5]))  # row 1: 7 tokens
    b[1, :5] = 0
    with torch.no_grad():
        model(a[:, :8], kv_cache=ca)
        model(b[:, :12], kv_cache=cb)
        ca.merge(cb, 20)  # a has 8 slots, b 12: a moves right by 4
        assert (ca.pos, ca.batch_size, ca.pad.tolist()) == (12, 3, [4, 0, 5])
        seqs = torch.cat([a[:, 8:10], b[:, 12:14]])  # (3, 2): each row's next two tokens
        out = [model(seqs[:, t:t + 1], kv_cache=ca)[:, 0] for t in range(2)]
        ca.reorder(torch.tensor([0, 2]))  # row 1 finishes; pads [4, 5]
        ca.trim_left(4)
        assert (ca.pos, ca.pad.tolist()) == (10, [0, 1])
        ca.trim_left(0)
        with pytest.raises(ValueError, match="fewer than 2 padding"):
            ca.trim_left(2)
        x = torch.tensor([7])  # row b1's next token
        out.append(model(torch.stack([a[0, 10:11], x]), kv_cache=ca)[:, 0])
        ref_a = model(a[:, :11])[0]  # (11, V): a alone, no cache
        ref_b0 = model(b[:1])[0]  # (14, V)
        ref_b1 = model(torch.cat([b[1:, 5:], x[None]], 1))[0]  # (10, V): b1's 9 real tokens + x
    torch.testing.assert_close(torch.stack([o[0] for o in out]), ref_a[8:11], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack([o[1] for o in out[:2]]), ref_b0[12:14], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack([out[0][2], out[1][2], out[2][1]]), ref_b1[7:10], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Loss, parameters, sizes


def test_loss_matches_cross_entropy_and_ignores_minus_one():
    cfg = tiny()
    model = random_model(cfg, seed=6)
    idx = torch.randint(0, cfg.vocab_size, (3, 12))
    targets = torch.randint(0, cfg.vocab_size, (3, 12))
    with torch.no_grad():
        logits = model(idx)
        assert torch.allclose(model(idx, targets), F.cross_entropy(logits.view(-1, 300), targets.view(-1)), atol=1e-6)
        masked = targets.clone()
        masked[0, :5] = -1
        masked[2, 7:] = -1
        keep = masked.view(-1) != -1
        expect = F.cross_entropy(logits.view(-1, 300)[keep], targets.view(-1)[keep])
        assert torch.allclose(model(idx, masked), expect, atol=1e-6)
        per_token = model(idx, masked, loss_reduction="none")
        assert per_token.shape == (3, 12)
        assert (per_token[0, :5] == 0).all() and (per_token[0, 5:] > 0).all()
        assert torch.allclose(model(idx, masked, loss_reduction="sum"), per_token.sum(), atol=1e-4)


def test_fresh_init_gives_uniform_prediction():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert model(idx, idx).item() == pytest.approx(math.log(300), abs=1e-5)
    # every block starts as the identity; non-output matrices are not zero
    assert all((b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all() for b in model.blocks)
    assert model.blocks[0].attn.c_q.weight.std() > 0


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_cover_every_parameter_once(tie):
    model = GPT(tiny(tie_embeddings=tie))
    groups = model.param_groups()
    assert set(groups) == {"matrix", "embedding", "lm_head", "scalar"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for p in groups["matrix"]) and all(p.ndim == 1 for p in groups["scalar"])
    assert len(groups["matrix"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert len(groups["scalar"]) == 2 * 4 + 1  # 2 norms + q_norm + k_norm per layer, final norm
    assert groups["lm_head"] == ([] if tie else [model.lm_head.weight])


@pytest.mark.parametrize("depth", [1, 2, 6, 12, 16, 17, 20, 26])
def test_from_depth_sizes(depth):
    c = ModelConfig.from_depth(depth, vocab_size=65536, max_seq_len=2048)
    assert c.n_layer == depth
    assert c.n_head * c.head_dim == c.n_embd and c.n_kv_head == c.n_head
    assert depth * 64 <= c.n_embd < depth * 64 + c.head_dim
    assert c.head_dim == (64 if depth < 16 else 128)
    assert c.intermediate_size % 64 == 0 and 0 <= c.intermediate_size - 8 * c.n_embd / 3 < 64
    assert ModelConfig.from_depth(depth, 100, 64, n_kv_head=1).n_kv_head == 1


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        tiny(n_head=4, n_kv_head=3)


def test_flops_and_param_counts():
    cfg = tiny(n_embd=256, n_head=4, n_kv_head=4, max_seq_len=8, vocab_size=1000)
    model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(exclude_embedding=True) == total - 1000 * 256
    flops = model.estimate_flops_per_token()
    six_n = 6 * model.num_params(exclude_embedding=True)
    assert flops == six_n + 12 * 2 * 4 * 64 * 8
    assert six_n < flops < 1.01 * six_n
    tied = GPT(tiny(tie_embeddings=True))
    assert tied.num_params() == tied.num_params(exclude_embedding=True)
    assert tied.num_params() == GPT(tiny()).num_params() - 300 * 64


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_round_trip(tmp_path, tie):
    cfg = tiny(tie_embeddings=tie)
    model = random_model(cfg, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 8)), torch.randint(0, 300, (1, 8))).backward()
    opt.step()
    rng = torch.get_rng_state()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "merges.txt").write_text("a b\n")
    path = save_checkpoint(tmp_path / "ckpt", torch.compile(model), tokenizer_dir=tok,
                           optimizer_state=opt.state_dict(),
                           train_state={"step": 5, "data": {"shard": 2, "row": 17}, "rng": rng},
                           meta={"stage": "pretrain"})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.pt", "state.json", "tokenizer"]
    loaded, info = load_checkpoint(path)
    assert info["model_config"] == cfg and info["config"]["stage"] == "pretrain"
    assert info["tokenizer_dir"] == path / "tokenizer" and (path / "tokenizer" / "merges.txt").exists()
    assert info["train_state"]["step"] == 5 and info["train_state"]["data"] == {"shard": 2, "row": 17}
    assert torch.equal(info["train_state"]["rng"], rng)
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    if tie:
        assert loaded.lm_head.weight is loaded.wte.weight
    opt_state = load_optimizer_state(path)
    assert torch.equal(opt_state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # save again over it: replaced, no leftovers
    save_checkpoint(path, GPT(cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]
    assert load_checkpoint(path)[1]["train_state"] is None


def test_checkpoint_unwraps_ddp_style_module(tmp_path):
    class Wrapper(torch.nn.Module):  # DDP exposes the model as .module and prefixes "module."
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = random_model(tiny(), seed=8)
    save_checkpoint(tmp_path / "c", Wrapper(model))
    loaded, _ = load_checkpoint(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    first = random_model(tiny(), seed=9)
    save_checkpoint(path, first, train_state={"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)  # fail mid-way: weights written, optimizer not
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, random_model(tiny(), seed=10), optimizer_state={"x": 1}, train_state={"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # temp folder cleaned up
    loaded, info = load_checkpoint(path)
    assert info["train_state"] == {"step": 1}
    assert torch.equal(loaded.wte.weight, first.wte.weight)


def test_crash_between_renames_is_recoverable(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(path, random_model(tiny(), seed=11), train_state={"step": 1})
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old -> ckpt.old succeeded, new -> ckpt "crashes"
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        save_checkpoint(path, random_model(tiny(), seed=12), train_state={"step": 2})
    monkeypatch.undo()
    with pytest.raises(ChatforgeError, match=r"previous checkpoint at .*ckpt\.old"):
        load_checkpoint(path)
    assert load_checkpoint(tmp_path / "ckpt.old")[1]["train_state"] == {"step": 1}
    save_checkpoint(path, random_model(tiny(), seed=12), train_state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(path)[1]["train_state"] == {"step": 2}


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ChatforgeError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"lr": 3}')
    with pytest.raises(ChatforgeError, match="not a chatforge checkpoint"):
        load_checkpoint(other)
    (tmp_path / "not_ckpt").mkdir()
    (tmp_path / "not_ckpt" / "data.txt").write_text("keep me")
    with pytest.raises(ChatforgeError, match="refusing to replace"):
        save_checkpoint(tmp_path / "not_ckpt", GPT(tiny()))
    assert (tmp_path / "not_ckpt" / "data.txt").read_text() == "keep me"

    save_checkpoint(tmp_path / "ckpt", GPT(tiny()))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    with pytest.raises(ChatforgeError, match="looks like a Hugging Face model folder"):
        load_checkpoint(tmp_path / "hf")

    cfg_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(cfg_file.read_text())
    config["model"]["vocab_size"] = 512
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(ChatforgeError, match=r"shape mismatch.*wte.weight"):
        load_checkpoint(tmp_path / "ckpt")
    config["model"]["vocab_size"] = 300
    config["model"]["n_layer"] = 3
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(ChatforgeError, match=r"missing.*blocks\.2"):
        load_checkpoint(tmp_path / "ckpt")
