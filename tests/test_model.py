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

torch.set_num_threads(2)


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
    return torch.stack(list(model.generate(idx, n, temperature=0)), dim=1)  # (B, n)


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
    assert calls == {"load": tmp_path / "ckpt" / "tokenizer", "export": out}
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
    assert ids[0].tolist() == tok.encode(text)
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


def test_generate_stops_at_context_and_sampling_options():
    cfg = tiny(max_seq_len=16)
    model = random_model(cfg, seed=5)
    prompt = [1, 2, 3, 4]
    assert len(list(model.generate(prompt, 100, temperature=0))) == 12  # capped at max_seq_len
    greedy = torch.cat(list(model.generate(prompt, 8, temperature=0)))
    assert torch.equal(torch.cat(list(model.generate(prompt, 8, top_k=1))), greedy)
    assert torch.equal(torch.cat(list(model.generate(prompt, 8, top_p=1e-6))), greedy)
    a = torch.cat(list(model.generate(prompt, 12, temperature=1.5, seed=11)))
    b = torch.cat(list(model.generate(prompt, 12, temperature=1.5, seed=11)))
    c = torch.cat(list(model.generate(prompt, 12, temperature=1.5, seed=12)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = torch.cat(list(model.generate(prompt, 1, temperature=5.0, top_k=3, seed=0)))
    with torch.no_grad():
        allowed = model(torch.tensor([prompt]))[0, -1].topk(3).indices
    assert top3.item() in allowed.tolist()


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
    # Count the FLOPs of a real forward + backward with torch's FlopCounterMode (matmuls; the math
    # SDPA backend so attention is matmuls too) and compare with the estimate used for MFU. The
    # estimate's "6 x non-embedding parameters" also counts the RMSNorm gains, which do no matmul:
    # that is the whole difference.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    B, T = 2, cfg.max_seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    counted = counter.get_total_flops() / (B * T)
    norm_params = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert counted > 0 and model.estimate_flops_per_token() == counted + 6 * norm_params
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
