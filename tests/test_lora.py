"""LoRA (chatforge/lora.py): merged == unmerged, only adapters learn, parity with PEFT on the exported
transformers model, the engine generates with the adapter in, resumable adapter state, bad settings."""

from __future__ import annotations

import pytest
import torch

from chatforge.checkpoint import save_checkpoint
from chatforge.common import ChatforgeError
from chatforge.lora import (LoRALinear, apply_lora, count_parameters, export_peft_adapter, load_lora_state_dict,
                            lora_parameters, lora_state_dict, merge_lora)
from chatforge.model import GPT, ModelConfig
from engine_helpers import randomize  # tests/engine_helpers.py
from sft_helpers import one_thread  # noqa: F401  (autouse fixture)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64), **kw})


def text_batch(shared_data, B=2, T=48):
    """Real bytes of Wikipedia text as token ids < 256 (the tiny vocab is 300)."""
    data = (shared_data / "text/wiki_demo.txt").read_bytes()[: B * (T + 1)]
    ids = torch.tensor(list(data), dtype=torch.long).view(B, T + 1)
    return ids[:, :-1], ids[:, 1:]


def adapted(seed=0, **kw):
    model = randomize(GPT(tiny()), seed)
    names = apply_lora(model, **kw)
    torch.manual_seed(seed + 1)
    for p in lora_parameters(model):  # B starts at 0; a trained adapter has both nonzero
        torch.nn.init.normal_(p, std=0.05)
    return model, names


def test_zero_init_is_the_base_model_and_merge_equals_unmerged(shared_data):
    x, _ = text_batch(shared_data)
    base = randomize(GPT(tiny()), 0)
    ref = base(x)
    model = randomize(GPT(tiny()), 0)
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(x), ref)  # B = 0: nothing changed yet
    model, _ = adapted(rank=4, alpha=8)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - ref).abs().max() > 1e-3  # the adapter does change the outputs
        merge_lora(model)
        merged = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(unmerged, merged, atol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())  # a plain GPT again: saves and exports as one


def test_only_lora_parameters_get_gradients_and_counts(shared_data):
    x, y = text_batch(shared_data)
    model, names = adapted(rank=4, alpha=8, targets=("c_q", "c_v", "mlp.c_proj"))
    assert names == ["blocks.0.attn.c_q", "blocks.1.attn.c_q", "blocks.0.attn.c_v", "blocks.1.attn.c_v",
                     "blocks.0.mlp.c_proj", "blocks.1.mlp.c_proj"]
    model(x, y).backward()
    lora = set(map(id, lora_parameters(model)))
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    # by hand: rank 4 x (in + out) per layer; c_q 64->64, c_v 64->32 (2 kv heads x 16), mlp.c_proj 192->64
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) + 4 * (192 + 64)
    trainable, total = count_parameters(model)
    assert trainable == 2 * per_layer
    assert total == GPT(tiny()).num_params() + trainable


def test_training_the_adapter_leaves_base_weights_alone(shared_data):
    x, y = text_batch(shared_data)
    model = randomize(GPT(tiny()), 0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=8, alpha=16, dropout=0.1)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    first = model(x, y).item()
    for _ in range(15):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert model(x, y).item() < first - 0.5
    for k, v in frozen.items():
        key = k if k in model.state_dict() else k.replace(".weight", ".base.weight")
        assert torch.equal(model.state_dict()[key], v), k


def test_engine_generates_with_the_adapter():
    """The engine's CPU fast path reads `.weight`; LoRALinear answers with the merged weight, so an
    unmerged model generates what the merged one does."""
    from chatforge.engine import Engine

    model, _ = adapted(rank=4, alpha=16, targets=("c_q", "c_k", "c_v", "c_gate", "lm_head"))
    model.eval()
    prompts = [[1, 5, 9, 200, 17], [3, 4]]
    unmerged = [c.tokens for c in Engine(model, None).generate(prompts, max_tokens=12, temperature=0)]
    merge_lora(model)
    merged = [c.tokens for c in Engine(model, None).generate(prompts, max_tokens=12, temperature=0)]
    assert unmerged == merged
    # and the base model alone generates something else (the adapter matters)
    base = [c.tokens for c in Engine(randomize(GPT(tiny()), 0), None).generate(prompts, max_tokens=12, temperature=0)]
    assert base != merged


def test_peft_loads_our_adapter_onto_the_exported_model(tmp_path, shared_data):
    """Reference check: our adapter exported in PEFT format, loaded by `peft` onto the transformers export
    of the base model, gives our logits; the merged export gives them too."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from chatforge.export import export_hf

    x, _ = text_batch(shared_data)
    base = randomize(GPT(tiny()), 0)
    save_checkpoint(tmp_path / "base", base)
    export_hf(tmp_path / "base", tmp_path / "base_hf")
    model, _ = adapted(rank=4, alpha=8, targets=("c_q", "c_v", "attn.c_proj", "c_up", "mlp.c_proj", "lm_head"))
    model.eval()
    export_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base_hf"))
    with torch.no_grad():
        ours = model(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs = with_adapter(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    merge_lora(model)
    save_checkpoint(tmp_path / "merged", model)
    export_hf(tmp_path / "merged", tmp_path / "merged_hf")
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32)
    with torch.no_grad():
        assert (merged_hf(x).logits - theirs).abs().max().item() < 1e-4


def test_adapter_state_round_trip(shared_data):
    x, _ = text_batch(shared_data)
    model, _ = adapted(rank=4, alpha=8)
    model.eval()
    state = lora_state_dict(model)
    assert set(state) == {f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in
                          ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_gate", "mlp.c_up", "mlp.c_proj")
                          for ab in "AB"}
    fresh = randomize(GPT(tiny()), 0)
    apply_lora(fresh, rank=4, alpha=8)
    fresh.eval()
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    other = randomize(GPT(tiny()), 0)
    apply_lora(other, rank=2, alpha=8)
    with pytest.raises(ChatforgeError, match="same rank"):
        load_lora_state_dict(other, state)
    partial = randomize(GPT(tiny()), 0)
    apply_lora(partial, rank=4, alpha=8, targets=("c_q",))
    with pytest.raises(ChatforgeError, match="do not match.*same targets"):
        load_lora_state_dict(partial, state)


def test_bad_lora_settings():
    with pytest.raises(ChatforgeError, match="'q_proj' matches no Linear layer; known: .*c_q"):
        apply_lora(GPT(tiny()), targets=("q_proj",))
    with pytest.raises(ChatforgeError, match="'wte' is not a Linear layer"):
        apply_lora(GPT(tiny()), targets=("wte",))
    with pytest.raises(ChatforgeError, match="tied embeddings"):
        apply_lora(GPT(tiny(tie_embeddings=True)), targets=("lm_head",))
    with pytest.raises(ChatforgeError, match="rank 0"):
        apply_lora(GPT(tiny()), rank=0)
    model = GPT(tiny())
    apply_lora(model)
    with pytest.raises(ChatforgeError, match="already has LoRA adapters"):
        apply_lora(model)
