"""RLHF: preference data on the real files, the Bradley-Terry and DPO losses against hand computations,
controlled experiments whose answer is known (a reward model learns polite > rude, DPO raises the held-out
margin), the LoRA reference, bad inputs, and the `chatforge rlhf` stage with resume and `score`."""

from __future__ import annotations

import copy
import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from chatforge.common import ChatforgeError
from chatforge.model import GPT, ModelConfig
from chatforge.tasks.conversations import SourceStats
from sft_helpers import one_thread, real_tokenizer  # noqa: F401  (one_thread: an autouse fixture)


def small_gpt(vocab: int, seed: int = 0, depth: int = 1, width: int = 64, max_seq_len: int = 128) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=depth, n_head=2, n_kv_head=2, n_embd=width,
                            max_seq_len=max_seq_len))
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # the real init zeroes the head: every reply alike
    return model


@pytest.fixture(scope="module")
def tok(shared_data):
    return real_tokenizer(str(shared_data))


# ----------------------------------------------------------------------------------------------
# Data


def test_hh_pairs_from_the_real_file(shared_data):
    from chatforge.tasks.preferences import load_pairs, parse_hh_transcript

    stats = SourceStats("hh")
    train = load_pairs("hh", "train", str(shared_data), val_fraction=0.2, judge_fraction=0.2, stats=stats)
    val = load_pairs("hh", "val", str(shared_data), val_fraction=0.2, judge_fraction=0.2)
    judge = load_pairs("hh", "judge", str(shared_data), val_fraction=0.2, judge_fraction=0.2)
    assert stats.records == 2312
    # every record is a pair of some split or skipped with its reason
    assert len(train) + len(val) + len(judge) + sum(stats.skipped.values()) == 2312
    assert set(stats.skipped) <= {"empty_reply", "identical_replies", "unparseable_transcript", "different_prompts",
                                  "no_final_reply", "not_a_pair"}
    prompts = lambda ps: {json.dumps(p.prompt) for p in ps}  # noqa: E731
    assert not prompts(train) & prompts(val) and not prompts(train) & prompts(judge) and not prompts(val) & prompts(judge)
    assert 0.15 < len(val) / 2312 < 0.25
    p = train[0]
    assert p.prompt[0]["role"] == "user" and p.prompt[-1]["role"] == "user" and p.chosen != p.rejected
    # the pair is exactly the record: the shared transcript + each final reply
    rec = json.loads(gzip.open(shared_data / "preference/hh_rlhf_harmless_base_test.jsonl.gz", "rt").readline())
    msgs = parse_hh_transcript(rec["chosen"])
    assert msgs[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)


def test_oasst_ranked_pairs(shared_data):
    from chatforge.tasks.preferences import load_pairs, oasst_ranked_pairs

    stats = SourceStats("oasst")
    pairs = [p for s in ("train", "val", "judge")
             for p in load_pairs("oasst", s, str(shared_data), val_fraction=0.2, judge_fraction=0.2)]
    load_pairs("oasst", "train", str(shared_data), stats=stats)
    assert stats.records == 100 and len(pairs) > 500
    # first tree: three ranked replies to the prompt -> 3 pairs at the root, rank 0 preferred over 1 and 2
    tree = json.loads((shared_data / "chat/oasst/en_100_tree.jsonl").open().readline())["prompt"]
    root = [p for p, _ in oasst_ranked_pairs(tree, "t", SourceStats()) if len(p.prompt) == 1]
    replies = {r["rank"]: r["text"].strip() for r in tree["replies"]}
    assert len(root) == 3 and sorted((p.chosen, p.rejected) for p in root) == sorted(
        [(replies[0], replies[1]), (replies[0], replies[2]), (replies[1], replies[2])])
    # K ranked replies give K(K-1)/2 pairs; ties and unranked replies are counted, not paired
    node = {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "a", "rank": 0}, {"role": "assistant", "text": "b", "rank": 1},
        {"role": "assistant", "text": "c", "rank": 1}, {"role": "assistant", "text": "d", "rank": 2},
        {"role": "assistant", "text": "e"}]}
    st = SourceStats()
    got = [(p.chosen, p.rejected) for p, _ in oasst_ranked_pairs(node, "x", st)]
    assert sorted(got) == sorted([("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")])
    assert st.skipped == {"tie": 1, "unranked_reply": 1}


def test_bad_records_are_counted_not_fatal(tmp_path):
    from chatforge.tasks.preferences import load_pairs

    H, A = "\n\nHuman: ", "\n\nAssistant: "
    recs = [{"chosen": f"{H}hi{A}hello", "rejected": f"{H}hi{A}go away"},  # fine
            {"chosen": f"{H}hi{A}same", "rejected": f"{H}hi{A}same"},  # identical
            {"chosen": f"{H}hi{A} ", "rejected": f"{H}hi{A}go away"},  # empty reply
            {"chosen": "no transcript here", "rejected": f"{H}hi{A}x"},  # unparseable
            {"chosen": f"{H}hi{A}a", "rejected": f"{H}hello{A}b"},  # the prompts differ
            {"chosen": f"{H}hi{A}a{A}b", "rejected": f"{H}hi{A}c"},  # turns do not alternate
            {"chosen": 3}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    stats = SourceStats()
    pairs = load_pairs(str(f), "train", val_fraction=0.0, stats=stats)
    assert [(p.chosen, p.rejected) for p in pairs] == [("hello", "go away")]
    assert stats.skipped == {"identical_replies": 1, "empty_reply": 1, "unparseable_transcript": 2,
                             "different_prompts": 1, "not_a_pair": 1, "not_json": 1}
    with pytest.raises(ChatforgeError, match="preference source"):
        load_pairs("nope")


def test_controlled_sets_follow_their_rule():
    from chatforge.tasks.preferences import arithmetic_pairs, load_pairs, polite_pairs

    for p, _ in arithmetic_pairs(50):
        a, b = map(int, p.prompt[0]["content"].removeprefix("What is ").rstrip("?").split(" + "))
        assert p.chosen == f"{a} + {b} = {a + b}." and p.rejected != p.chosen
    for p, _ in polite_pairs(50):
        assert p.chosen != p.rejected and any(w in p.rejected for w in ("Ugh", "Seriously", "dumb", "idiot",
                                                                        "whatever", "kidding"))
    tr, va = load_pairs("polite", "train", val_fraction=0.2), load_pairs("polite", "val", val_fraction=0.2)
    triple = lambda p: (p.prompt[0]["content"], p.chosen, p.rejected)  # noqa: E731
    assert tr and va and not {triple(p) for p in tr} & {triple(p) for p in va}


def test_pair_tokens_are_the_chat_protocol(tok):
    from chatforge.pairs import collate, encode_pair
    from chatforge.tasks.preferences import PreferencePair

    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "how are you?"}]
    p = PreferencePair("x", prompt, "fine, thanks", "leave me alone")
    e, _ = encode_pair(tok, p, 128)
    full, _ = tok.render_conversation(prompt + [{"role": "assistant", "content": "fine, thanks"}])
    assert e.prompt + e.chosen == full and e.chosen[-1] == tok.special("<|assistant_end|>")
    b = collate([e], tok.bos_id)
    assert b["ids"].shape[0] == 2 and b["ids"][0, b["lengths"][0] - 1] == tok.special("<|assistant_end|>")
    assert int(b["response_mask"][0].sum()) == len(e.chosen) and int(b["response_mask"][1].sum()) == len(e.rejected)
    # a long prompt loses its oldest exchange first; a pair that cannot fit is dropped with a reason
    e2, _ = encode_pair(tok, p, len(e.prompt) + len(e.rejected) - 1)
    assert e2 is not None and len(e2.prompt) < len(e.prompt)
    assert encode_pair(tok, p, 5) == (None, "too_long")


# ----------------------------------------------------------------------------------------------
# Losses against hand computations


def test_bradley_terry_loss_by_hand():
    from chatforge.losses import bradley_terry_loss

    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    by_hand = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(rc.tolist(), rr.tolist())) / 3
    assert float(bradley_terry_loss(rc, rr)) == pytest.approx(by_hand, rel=1e-6)
    assert float(bradley_terry_loss(torch.tensor([100.0]), torch.tensor([0.0]))) == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(float(bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))))


def _seq_logp(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one position at a time (the slow, obvious way)."""
    total = 0.0
    with torch.no_grad():
        for t in range(start, len(ids)):
            logits = model(torch.tensor([ids[:t]]))[0, -1]
            total += float(F.log_softmax(logits.float(), -1)[ids[t]])
    return total


def test_dpo_pair_loss_by_hand(tok):
    from chatforge.dpo import dpo_pair_loss
    from chatforge.pairs import encode_pair
    from chatforge.tasks.preferences import PreferencePair

    policy, ref = small_gpt(tok.vocab_size, seed=1), small_gpt(tok.vocab_size, seed=2)
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    chosen, rejected, beta = "2 + 2 = 4.", "No idea.", 0.5
    e, _ = encode_pair(tok, PreferencePair("x", prompt, chosen, rejected), 128)
    n = len(e.prompt)
    lw = {m: _seq_logp(m, e.prompt + e.chosen, n) for m in (policy, ref)}
    ll = {m: _seq_logp(m, e.prompt + e.rejected, n) for m in (policy, ref)}
    margin = beta * ((lw[policy] - lw[ref]) - (ll[policy] - ll[ref]))
    by_hand = math.log(1 + math.exp(-margin))
    loss = dpo_pair_loss(policy, ref, tok, prompt, chosen, rejected, beta)
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-4)
    loss.backward()
    assert policy.wte.weight.grad is not None and ref.wte.weight.grad is None
    # the policy as its own reference: every margin 0, loss log 2
    assert float(dpo_pair_loss(policy, copy.deepcopy(policy), tok, prompt, chosen, rejected, beta).detach()) == \
        pytest.approx(math.log(2), rel=1e-6)


def test_lora_reference_is_the_base_model(tok):
    from chatforge.dpo import dpo_pair_loss, reference_logps
    from chatforge.lora import adapters_disabled, apply_lora
    from chatforge.pairs import collate, encode_pair
    from chatforge.tasks.preferences import PreferencePair

    base = small_gpt(tok.vocab_size, seed=3)
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the model
    e, _ = encode_pair(tok, PreferencePair("x", [{"role": "user", "content": "hi"}], "hello there", "go"), 128)
    b = collate([e], tok.bos_id)
    x = b["input_ids"]
    assert not torch.allclose(model(x), base(x), atol=1e-4)
    with adapters_disabled(model):
        assert torch.allclose(model(x), base(x), atol=1e-5)
    assert not torch.allclose(model(x), base(x), atol=1e-4)  # back on afterwards
    from chatforge.dpo import sequence_logps
    from chatforge.lora import AdaptersOff
    assert torch.allclose(reference_logps(model, None, b), sequence_logps(base, b), atol=1e-4)
    assert torch.allclose(AdaptersOff(model)(x), base(x), atol=1e-5)  # GRPO's KL reference, the same way
    # DPO against the adapters-off model == DPO against an explicit copy of the base
    args = (tok, [{"role": "user", "content": "hi"}], "hello there", "go", 0.1)
    with torch.no_grad():
        assert float(dpo_pair_loss(model, None, *args)) == pytest.approx(float(dpo_pair_loss(model, base, *args)), rel=1e-4)
    with pytest.raises(ChatforgeError, match="no LoRA adapters"):
        with adapters_disabled(base):
            pass


# ----------------------------------------------------------------------------------------------
# Controlled experiments


def _encoded(tok, name, split, n=0):
    from chatforge.pairs import encode_pairs
    from chatforge.tasks.preferences import load_pairs

    return encode_pairs(tok, load_pairs(name, split, val_fraction=0.2, limit=n), 128)


def test_reward_model_learns_polite_over_rude(tok):
    """A known rule: the polite version of the same answer is preferred. A tiny reward model trained on the
    train split ranks held-out pairs (never the same triple) right at >= 90%."""
    from chatforge.pairs import PairSource
    from chatforge.reward_model import RewardModel, pair_accuracy, rm_loss
    from chatforge.train_loop import LoopConfig, Trainer

    train, val = _encoded(tok, "polite", "train"), _encoded(tok, "polite", "val")
    rm = RewardModel(small_gpt(tok.vocab_size))
    before = pair_accuracy(rm, val, tok.bos_id)
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0  # zero head: every score 0, ties count wrong
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    Trainer(rm, opt, rm_loss, PairSource(train, 16, tok.bos_id), LoopConfig(num_steps=40), say=lambda s: None).run()
    after = pair_accuracy(rm, val, tok.bos_id)
    assert after["n"] == len(val) > 100
    assert after["accuracy"] >= 0.9 and after["accuracy_low"] > 0.5 and after["margin"] > 0


def test_dpo_raises_held_out_margin_and_preferred_rate(tok):
    from chatforge.dpo import dpo_train_loss, evaluate_dpo
    from chatforge.pairs import PairSource
    from chatforge.train_loop import LoopConfig, Trainer

    train, val = _encoded(tok, "polite", "train"), _encoded(tok, "polite", "val", 100)
    policy = small_gpt(tok.vocab_size, seed=4)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    before = evaluate_dpo(policy, ref, val, tok.bos_id, beta=0.1)
    assert before["margin"] == 0.0 and before["implicit_accuracy"] == 0.0 and before["loss"] == pytest.approx(math.log(2))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    Trainer(policy, opt, dpo_train_loss(0.1, nll_coef=0.1, reference=ref), PairSource(train, 8, tok.bos_id),
            LoopConfig(num_steps=25), say=lambda s: None).run()
    after = evaluate_dpo(policy, ref, val, tok.bos_id, beta=0.1)
    assert after["margin"] > 0.5 and after["implicit_accuracy"] >= 0.9 and after["implicit_accuracy_low"] > 0.5
    assert after["preferred_logprob_rate"] > before["preferred_logprob_rate"]
    assert after["loss"] < before["loss"]


# ----------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tok):
    """runs/r/sft/checkpoint: a random depth-1 GPT (context 128) with the real tokenizer, marked done."""
    from chatforge.checkpoint import save_checkpoint
    from chatforge.common import write_json

    root = tmp_path_factory.mktemp("rlhf")
    tok.save(root / "tok")
    sft = root / "runs" / "r" / "sft"
    save_checkpoint(sft / "checkpoint", small_gpt(tok.vocab_size), tokenizer_dir=root / "tok", meta={"stage": "sft"})
    write_json(sft / "DONE", {"stage": "sft"})
    return root


def _cfg(root, shared, run="r", **kw):
    from chatforge.config import RlhfConfig

    base = dict(run=run, runs_dir=str(root / "runs"), data_dir=str(shared), threads=1, rm_data=["polite", "oasst"],
                dpo_data=["polite"], train_pairs=200, eval_pairs=40, controlled_pairs=400, batch_size=8,
                rm_steps=6, dpo_steps=6, rm_lr=3e-3, lr_frac=1.0, eval_every=3, checkpoint_every=3,
                warmdown_ratio=0.0)  # a constant rate: the 3-step run is the first half of the 6-step one
    base.update(kw)
    return RlhfConfig(**base)


def _copy_sft(root, run):
    import shutil

    dst = root / "runs" / run / "sft"
    if not dst.exists():
        shutil.copytree(root / "runs" / "r" / "sft", dst)


def test_rlhf_stage_runs_resumes_and_scores(run_root, shared_data, capsys):
    from safetensors.torch import load_file

    from chatforge import cli
    from chatforge.checkpoint import read_config
    from chatforge.reward_model import REWARD_HEAD_FILE, load_reward_model
    from chatforge.stages import rlhf

    root = run_root
    s = rlhf.run(_cfg(root, shared_data))
    out = root / "runs" / "r" / "rlhf"
    for f in ("DONE", "rm/DONE", "rm/summary.json", "rm/metrics.jsonl", f"rm/checkpoint/{REWARD_HEAD_FILE}",
              "dpo/DONE", "dpo/summary.json", "dpo/before.json", "dpo/checkpoint/model.safetensors"):
        assert (out / f).exists(), f
    assert read_config(out / "rm/checkpoint")["reward_model"] is True
    assert read_config(out / "dpo/checkpoint")["stage"] == "rlhf"
    load_reward_model(out / "rm/checkpoint")
    acc = s["rm"]["accuracy"]
    assert set(acc) == {"polite", "oasst"} and all(a["accuracy_low"] <= a["accuracy"] <= a["accuracy_high"]
                                                   for a in acc.values())
    assert s["dpo"]["after"]["polite"]["margin"] > s["dpo"]["before"]["polite"]["margin"]
    records = [json.loads(x) for x in (out / "dpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == [1, 2, 3, 4, 5, 6]
    assert all("margin" in r for r in records if "loss" in r and "event" not in r)
    assert rlhf.run(_cfg(root, shared_data))["dpo"]["steps"] == 6  # complete: a no-op
    # the DPO policy is the run's "rlhf" checkpoint for evaluation and the report
    from chatforge.config import EvalConfig
    from chatforge.report import latest_checkpoint
    from chatforge.stages.evaluate import targets
    ev = dict(run="r", runs_dir=str(root / "runs"))
    assert targets(EvalConfig(**ev, source="rlhf")) == [("rlhf", out / "dpo" / "checkpoint")]
    assert ("rlhf", out / "dpo" / "checkpoint") in targets(EvalConfig(**ev))
    assert targets(EvalConfig(**ev, source=str(out / "dpo" / "checkpoint")))[0][0] == "rlhf"
    assert latest_checkpoint(root / "runs" / "r") == out / "dpo" / "checkpoint"

    # stopped after the step-3 checkpoints and resumed: the same weights as the uninterrupted run
    _copy_sft(root, "split")
    rlhf.run(_cfg(root, shared_data, "split", rm_steps=3, dpo_steps=3))
    for a in ("rm", "dpo"):
        (root / "runs" / "split" / "rlhf" / a / "DONE").unlink()
    (root / "runs" / "split" / "rlhf" / "DONE").unlink()
    rlhf.run(_cfg(root, shared_data, "split"))
    for f in ("rm/checkpoint/model.safetensors", f"rm/checkpoint/{REWARD_HEAD_FILE}", "dpo/checkpoint/model.safetensors"):
        a, b = load_file(out / f), load_file(root / "runs" / "split" / "rlhf" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f

    # score from the command line
    capsys.readouterr()
    rc = cli.main(["rlhf", "score", "--run", "r", "--runs_dir", str(root / "runs"), "--prompt", "Can you tell me "
                   "what bees make?", "--replies", "Of course! Bees make honey.||What a dumb question. Bees make honey."])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prompt: Can you tell me") and len(lines) == 3
    assert rlhf.run(_cfg(root, shared_data, action="score", prompt="hi", replies="a||b"))["results"][0]["scores"]


def test_rlhf_lora_and_bad_inputs(run_root, shared_data, tmp_path, tok):
    from chatforge.checkpoint import save_checkpoint
    from chatforge.reward_model import load_reward_model
    from chatforge.config import ConfigError
    from chatforge.stages import rlhf
    from chatforge.tokenizer import Tokenizer

    root = run_root
    _copy_sft(root, "lora")
    s = rlhf.run(_cfg(root, shared_data, "lora", action="dpo", lora_rank=4, dpo_steps=4, lora_lr=3e-3))
    assert s["dpo"]["lora_rank"] == 4 and s["dpo"]["after"]["polite"]["margin"] > 0
    assert (root / "runs" / "lora" / "rlhf" / "dpo" / "checkpoint" / "lora_adapters.safetensors").exists()
    # LoRA in the other trainers too: the reward models (adapters + head) and GRPO (KL to the adapters-off base)
    small = dict(lora_rank=4, lora_lr=3e-3, rm_data=["polite"], rm_steps=3, grpo_data=["polite"], grpo_steps=2,
                 prompts_per_step=2, group_size=2, max_tokens=8, eval_every=2, eval_prompts=2, checkpoint_every=2)
    for action in ("rm", "judge", "grpo"):
        s = rlhf.run(_cfg(root, shared_data, "lora", action=action, **small))
    out = root / "runs" / "lora" / "rlhf"
    for a in ("rm", "judge", "grpo"):
        assert (out / a / "checkpoint" / "lora_adapters.safetensors").exists(), a
    load_reward_model(out / "rm" / "checkpoint")  # merged weights + head: a plain reward model
    assert s["grpo"]["steps"] == 2
    records = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kl", 0) > 0 for r in records if "loss" in r and "event" not in r)

    with pytest.raises(ConfigError, match="--action"):
        rlhf.run(_cfg(root, shared_data, action="bogus"))
    with pytest.raises(ConfigError, match="--beta"):
        rlhf.run(_cfg(root, shared_data, beta=0))
    # a reward model with another tokenizer than the policy's: a clear error before training
    ranks = dict(tok.mergeable_ranks)
    a, b = sorted(ranks, key=ranks.get)[300:302]
    ranks[a], ranks[b] = ranks[b], ranks[a]  # same size, two tokens' ids swapped: other ids for some texts
    other = Tokenizer(ranks, tok.pattern, tok.special_tokens)
    other.save(tmp_path / "tok2")
    rm_dir = root / "runs" / "mismatch" / "rlhf" / "rm" / "checkpoint"
    save_checkpoint(rm_dir, small_gpt(tok.vocab_size), tokenizer_dir=tmp_path / "tok2", meta={"reward_model": True})
    _copy_sft(root, "mismatch")
    with pytest.raises(ChatforgeError, match="another tokenizer"):
        rlhf.run(_cfg(root, shared_data, "mismatch", action="dpo"))
    with pytest.raises(ChatforgeError, match="not a reward model"):
        rlhf.run(_cfg(root, shared_data, "r", action="score", rm=str(root / "runs" / "r" / "sft" / "checkpoint"),
                      prompt="hi", replies="a||b"))
    with pytest.raises(ChatforgeError, match="--prompt"):
        rlhf.run(_cfg(root, shared_data, "r", action="score"))


# ----------------------------------------------------------------------------------------------
# GRPO against the reward model, and the reward-hacking monitor


def test_hacking_monitor_stops_when_reward_and_judge_diverge():
    from chatforge.rlhf_grpo import HackingMonitor

    m = HackingMonitor(patience=2)
    # both rise, then the reward model keeps rising while the judge falls twice in a row
    verdicts = [m.update(s, rm, j) for s, rm, j in [(0, 0.0, 0.0), (10, 1.0, 0.5), (20, 2.0, 0.4), (30, 3.0, 0.3)]]
    assert [v["improved"] for v in verdicts] == [True, True, False, False]
    assert [v["stop"] for v in verdicts] == [False, False, False, True]
    assert m.best_step == 10 and m.best_judge == 0.5
    # both falling is not hacking (the policy got worse for both): no stop
    m2 = HackingMonitor(patience=1)
    m2.update(0, 1.0, 1.0)
    assert not m2.update(10, 0.5, 0.5)["stop"]
    assert m2.update(20, 1.5, 0.5)["stop"]


def test_reward_model_task_scores_replies(tok):
    from chatforge.reward_model import RewardModel, score_replies
    from chatforge.rlhf_grpo import RewardModelTask
    from chatforge.tasks.rl import RLItem

    rm = RewardModel(small_gpt(tok.vocab_size, seed=5))
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    item = RLItem("x", [{"role": "user", "content": "hi"}], "")
    task = RewardModelTask(rm, tok, {"train": [item], "val": []})
    r, reason = task.reward("hello there", item)
    assert reason == "scored" and r == pytest.approx(score_replies(rm, tok, item.messages, ["hello there"])[0])
    assert task.reward("  ", item) == (0.0, "empty")
    assert task.reward("word " * 500, item) == (0.0, "too_long")
    assert task.items("train") == [item]


def test_rlhf_grpo_with_judge(run_root, shared_data):
    from chatforge.stages import rlhf

    root = run_root
    _copy_sft(root, "g")
    with pytest.raises(ChatforgeError, match="needs the rm reward model"):
        rlhf.run(_cfg(root, shared_data, "g", action="grpo"))
    small = dict(rm_data=["polite"], rm_steps=4, grpo_data=["polite"], grpo_steps=4, prompts_per_step=2, group_size=2,
                 max_tokens=8, eval_every=2, eval_prompts=4, checkpoint_every=2)
    for action in ("rm", "judge", "grpo"):
        s = rlhf.run(_cfg(root, shared_data, "g", action=action, **small))
    out = root / "runs" / "g" / "rlhf"
    g = s["grpo"]
    assert (out / "judge" / "checkpoint" / "reward_head.safetensors").exists()
    assert (out / "grpo" / "best" / "model.safetensors").exists() and (out / "grpo" / "hacking.png").exists()
    assert [h["step"] for h in g["monitor"]["history"]] == [0, 2, 4]
    records = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert len(steps) == 4 and all("reward" in r and "kl" in r for r in steps)
    assert all("judge_score" in r and "rm_score" in r for r in records if r.get("event") == "eval")
    # --kl_budget: a budget the first update already exceeds stops the run after the next step
    g2 = rlhf.run(_cfg(root, shared_data, "g", action="grpo", force=True, kl_budget=1e-12, **small))["grpo"]
    assert g2["steps"] == 3 and g2["stopped_early"] and g2["kl_budget"] == 1e-12
    evals = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_since_eval"] > 1e-12 for r in evals if r.get("event") == "eval" and r["step"] == 2] == [True]
