"""GRPO on verifiable rewards: the batch source that samples groups of replies through the engine and
scores them, and the loss the one training loop (train_loop.Trainer) minimises.

One RL step (DeepSeekMath's GRPO, https://arxiv.org/abs/2402.03300, section 4.1):

    1. take `prompts` task items; the engine samples `group_size` replies to each (batched, KV cache,
       tools run mid-reply; rollout.rollout_batch), with the policy's current weights
    2. the task's verifier scores each reply (tasks/rl.py: reward and reason, never an exception)
    3. advantages are group-relative: reward minus the group's mean, divided by its std unless
       normalize_by_std is off (Dr. GRPO, https://arxiv.org/abs/2503.20783); groups whose replies all
       got the same reward carry no signal and are dropped (DAPO's dynamic sampling,
       https://arxiv.org/abs/2503.14476), and a rollout with no signal at all is sampled again (a few tries)
    4. the kept rows are split into the step's micro-batches; `epochs` optimizer steps are taken on
       them (PPO's inner epochs, clipped ratio against the log-probs of the policy that sampled)

The loss is token-level over the whole step (DAPO): every sampled reply token of the step weighs the
same, whatever its reply's length or micro-batch. Tool output inserted by the engine is masked out.

The engine samples with the very module being trained: it re-derives its CPU inference layout of the
weights whenever an optimizer step changed them (GPT.inference_weights keys on the parameters'
versions), so rollouts always come from the current policy (tested in tests/test_grpo.py).

Log-probs are taken at temperature 1 (the model's own distribution), which is what is sampled by
default; sampling at another temperature makes the first epoch slightly off-policy.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from chatforge.losses import LOSS_TYPES, compute_group_normalized_rewards, get_response_log_probs, \
    grpo_microbatch_train_step, masked_mean
from chatforge.rollout import rollout_batch
from chatforge.stats import wilson_interval  # noqa: F401  (re-exported: grpo.wilson_interval)
from chatforge.tasks.rl import RewardStats, RLItem, RLTask


@dataclass
class GrpoSettings:
    """What one GRPO step samples and how it learns from it (a stage builds this from its config)."""

    prompts: int = 8  # task items per step
    group_size: int = 8  # replies sampled per item (G)
    micro_batches: int = 1  # forward/backward passes per step (= the loop's grad_accum)
    epochs: int = 1  # optimizer steps per rollout (PPO inner epochs); > 1 needs grpo_clip
    loss_type: str = "grpo_clip"  # losses.LOSS_TYPES
    normalize_by_std: bool = True  # divide advantages by the group's std (False: Dr. GRPO)
    cliprange: float = 0.2  # PPO's epsilon
    kl_coef: float = 0.0  # k3 KL to the frozen reference per token; 0 keeps no reference
    max_tokens: int = 64  # reply length, tool output included
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    use_tools: bool = True
    max_tool_calls: int = 2
    resample: int = 2  # extra rollouts tried when every group of one had equal rewards
    seed: int = 0

    def check(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r}: choose from {', '.join(LOSS_TYPES)}")
        if self.epochs > 1 and self.loss_type != "grpo_clip":
            raise ValueError("epochs > 1 reuses a rollout after the policy moved: it needs loss_type grpo_clip "
                             "(the ratio to the sampling policy); the other losses assume on-policy samples")
        if min(self.prompts, self.group_size, self.micro_batches, self.epochs, self.max_tokens) < 1:
            raise ValueError(f"prompts, group_size, micro_batches, epochs and max_tokens must be >= 1: {self}")


def reply_text(tok, completion) -> str:
    """What the model itself wrote in a reply: its sampled tokens decoded, the tool output the engine
    inserted left out (and the stop token). The verifier reads this, so a reply that calls the
    python tool and stops without stating the result earns nothing for the number the tool printed."""
    ids = [t for t, m in zip(completion.tokens, completion.mask) if m]
    if completion.finish_reason == "stop" and ids and completion.tokens and ids[-1] == completion.tokens[-1]:
        ids = ids[:-1]
    return tok.decode(ids)


# ----------------------------------------------------------------------------------------------
# The batch source


class RolloutSource:
    """A train_loop batch source: `next_batch()` returns the next micro-batch of the current rollout,
    sampling a new rollout when the last one's epochs are used up. Micro-batch (a dict):

        input_ids, labels      (B, T) long     prompt + reply, shifted by one (rollout.rollout_batch)
        response_mask          (B, T) bool     sampled reply tokens (prompt, padding, tool output: 0)
        advantages, rewards    (B,)   float
        normalize_constant     float           makes the step's loss a mean over all its reply tokens
        old_log_probs          (B, T) float    after the first epoch: the sampling policy's log-probs
        ref_log_probs          (B, T) float    with kl_coef > 0: the frozen reference's
        stats                  dict            the rollout's metrics (reward, correct, length, ...), logged

    `state_dict()` holds the position in the task's items, the rollout count (each rollout's sampling
    seed derives from it) and, between the epochs of one rollout, its unused micro-batches, so a
    resumed run samples and trains exactly as the uninterrupted one."""

    def __init__(self, engine, tok, task: RLTask, items: list[RLItem], settings: GrpoSettings, *,
                 ref_model=None, device=None, say=print):
        settings.check()
        if not items:
            raise ValueError(f"task {task.name}: no training items")
        if settings.kl_coef and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        self.engine, self.tok, self.task, self.items, self.s = engine, tok, task, items, settings
        self.ref_model, self.device, self.say = ref_model, device or engine.device, say
        self.reward_stats = RewardStats(task)
        self.rollouts = 0  # rollouts sampled (seeds the next one)
        self.cursor = 0  # items drawn so far, over all passes
        self.queue: list[dict] = []  # micro-batches still to train on (epochs x micro_batches)
        self.last: dict = {}  # the last rollout's stats
        self.pad_id = tok.bos_id if hasattr(tok, "bos_id") else 0

    # -- items in a seeded order, pass after pass --

    def _draw(self, n: int) -> list[RLItem]:
        out = []
        for _ in range(n):
            pass_, i = divmod(self.cursor, len(self.items))
            order = list(range(len(self.items)))
            random.Random(f"{self.s.seed}|{pass_}").shuffle(order)
            out.append(self.items[order[i]])
            self.cursor += 1
        return out

    # -- one rollout --

    def _sample(self, chosen: list[RLItem]) -> dict:
        """group_size replies to each chosen item with the current weights (rollout.rollout_batch's dict),
        seeded by the rollout count; counts the rollout. PPO's source (ppo.py) samples through this too."""
        s = self.s
        prompts = [self.tok.render_prompt(it.messages) for it in chosen]
        was = self.engine.model.training
        self.engine.model.eval()
        try:
            batch = rollout_batch(self.engine, prompts, s.group_size, pad_id=self.pad_id, max_tokens=s.max_tokens,
                                  temperature=s.temperature, top_k=s.top_k or None,
                                  seed=hash_seed(s.seed, self.rollouts), use_tools=s.use_tools,
                                  max_tool_calls=s.max_tool_calls)
        finally:
            self.engine.model.train(was)
        self.rollouts += 1
        return batch

    def _rollout(self) -> tuple[dict, dict]:
        s = self.s
        chosen = self._draw(s.prompts)
        batch = self._sample(chosen)
        comps = batch["completions"]
        replies = [reply_text(self.tok, c) for c in comps]
        truths = [chosen[c.prompt_index] for c in comps]
        adv, raw, meta = compute_group_normalized_rewards(self.reward_stats, replies, truths, s.group_size,
                                                          normalize_by_std=s.normalize_by_std)
        return batch, dict(meta, advantages=adv, rewards=raw, replies=replies)

    def _new_rollout(self) -> None:
        s = self.s
        t0 = time.time()
        tries = 0
        while True:
            batch, scored = self._rollout()
            keep = scored["keep"]
            tries += 1
            if keep.any() or tries > s.resample:
                break
        comps, n = batch["completions"], len(batch["completions"])
        reasons = scored["reasons"]
        lengths = [len(c.tokens) for c in comps]
        stats = {"reward": scored["reward_mean"], "correct": reasons.get("correct", 0) / n,
                 "no_answer": reasons.get("no_answer", 0) / n, "response_length": sum(lengths) / n,
                 "truncated": sum(c.finish_reason == "length" for c in comps) / n,
                 "tool_calls": sum(len(c.tool_calls) for c in comps) / n,
                 "groups_dropped": scored["groups_dropped"] / s.prompts, "rollout_tries": tries,
                 "rollout_s": time.time() - t0}
        self.last = dict(stats, example=scored["replies"][0][:200])
        rows = keep.nonzero().flatten().tolist() or list(range(n))  # no signal after the retries: zero advantages
        self.queue = self._micro_batches(batch, scored, rows, stats) * s.epochs

    def _micro_batches(self, batch: dict, scored: dict, rows: list[int], stats: dict) -> list[dict]:
        """The kept rows split into micro_batches pieces, each trimmed to its longest row."""
        s = self.s
        mask = batch["response_mask"]  # (N, L-1)
        step_tokens = max(1.0, float(mask[rows].sum()))
        pieces = [rows[i::s.micro_batches] for i in range(s.micro_batches)]
        out = []
        for piece in pieces:
            empty = not piece
            if empty:  # fewer kept rows than micro-batches: a row with nothing to learn (mask 0)
                piece = rows[:1]
            idx = torch.tensor(piece)
            m = mask[idx].clone()  # (B, L-1)
            if empty:
                m.zero_()
            seen = (batch["response_mask"][idx] | (batch["labels"][idx] != self.pad_id)).any(0)
            T = int(seen.nonzero().max()) + 1 if seen.any() else 1
            mb = {"input_ids": batch["input_ids"][idx, :T], "labels": batch["labels"][idx, :T],
                  "response_mask": m[:, :T], "advantages": scored["advantages"][idx].float(),
                  "rewards": scored["rewards"][idx].float(),
                  # sum over the piece's rows / c, mean over its B rows = (piece's token sum) x micro / step tokens,
                  # so the loop's mean over micro-batches is the step's token mean
                  "normalize_constant": step_tokens / (len(piece) * s.micro_batches), "stats": stats}
            if self.ref_model is not None and s.kl_coef:
                with torch.no_grad():
                    mb["ref_log_probs"] = get_response_log_probs(
                        self.ref_model, mb["input_ids"].to(self.device), mb["labels"].to(self.device))["log_probs"].cpu()
            out.append(mb)
        return out

    # -- the batch source protocol --

    def next_batch(self) -> dict:
        if not self.queue:
            self._new_rollout()
        mb = self.queue.pop(0)
        out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        out["_queued"] = mb  # the loss records the sampling policy's log-probs here for the later epochs
        return out

    def state_dict(self) -> dict:
        def plain(v):
            return {"tensor": v.tolist(), "dtype": str(v.dtype).removeprefix("torch.")} if isinstance(v, torch.Tensor) else v
        return {"rollouts": self.rollouts, "cursor": self.cursor,
                "queue": [{k: plain(v) for k, v in mb.items()} for mb in self.queue]}

    def load_state_dict(self, d: dict) -> None:
        def tensor(v):
            return torch.tensor(v["tensor"], dtype=getattr(torch, v["dtype"])) if isinstance(v, dict) and "tensor" in v else v
        self.rollouts, self.cursor = int(d["rollouts"]), int(d["cursor"])
        self.queue = [{k: tensor(v) for k, v in mb.items()} for mb in d.get("queue", [])]


def hash_seed(seed: int, n: int) -> int:
    """Rollout n's sampling seed: distinct per rollout, the same on a rerun."""
    return (seed * 1_000_003 + n * 7_919 + 12_345) % (2 ** 31)


# ----------------------------------------------------------------------------------------------
# The loss


def grpo_loss(settings: GrpoSettings):
    """loss_fn(model, micro_batch) -> (loss, metrics) for train_loop.Trainer (which divides by the
    micro-batch count and calls backward). The first epoch of a rollout records its log-probs in the
    micro-batch as the sampling policy's (the weights have not moved since sampling), so later epochs
    take the clipped ratio against them without another forward pass."""
    s = settings

    def loss_fn(model, mb: dict):
        out = get_response_log_probs(model, mb["input_ids"], mb["labels"], return_token_entropy=True)
        logp = out["log_probs"]  # (B, T)
        if "old_log_probs" not in mb:
            mb["old_log_probs"] = logp.detach()
            if "_queued" in mb:
                mb["_queued"]["old_log_probs"] = logp.detach().cpu()
        loss, meta = grpo_microbatch_train_step(
            logp, mb["response_mask"], 1, s.loss_type, raw_rewards=mb["rewards"][:, None],
            advantages=mb["advantages"][:, None], old_log_probs=mb["old_log_probs"], cliprange=s.cliprange,
            kl_coef=s.kl_coef, ref_log_probs=mb.get("ref_log_probs"), normalize_constant=mb["normalize_constant"],
            backward=False)
        mask = mb["response_mask"]
        metrics = {k: v for k, v in mb["stats"].items() if isinstance(v, (int, float))}
        metrics["entropy"] = masked_mean(out["token_entropy"].detach(), mask) if mask.any() else 0.0
        metrics["pg_loss"] = meta["pg_loss"]
        metrics["n_tokens"] = float(mb["input_ids"].numel())  # positions forwarded, for tokens/s
        if "kl" in meta:
            metrics["kl"] = meta["kl"]
        if "clip_fraction" in meta:
            metrics["clip_fraction"] = meta["clip_fraction"]
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Held-out measurement


def evaluate_task(engine, tok, task: RLTask, items: list[RLItem], *, k: int = 0, max_tokens: int = 64,
                  temperature: float = 1.0, use_tools: bool = True, max_tool_calls: int = 2, seed: int = 0,
                  batch_size: int = 32) -> dict:
    """pass@1 (greedy) on `items` with its 95% Wilson interval, and with k > 0 pass@k (k replies
    sampled at `temperature`: the share of items with at least one right). Replies are scored as in
    training (reply_text: the model's own words). Returns {"pass@1", "pass@1_low", "pass@1_high",
    "pass@k" (+ "k"), "n", "reasons", "examples"}."""
    was = engine.model.training
    engine.model.eval()
    try:
        def replies(n, temp, sd):
            out = []
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                comps = engine.generate([tok.render_prompt(it.messages) for it in chunk], n=n, max_tokens=max_tokens,
                                        temperature=temp, seed=sd, use_tools=use_tools, max_tool_calls=max_tool_calls)
                out += [(chunk[c.prompt_index], reply_text(tok, c)) for c in comps]
            return out

        stats = RewardStats(task)
        greedy = replies(1, 0.0, None)
        right = [stats(text, it)[1] == "correct" for it, text in greedy]
        lo, hi = wilson_interval(sum(right), len(right))
        res = {"pass@1": sum(right) / max(1, len(right)), "pass@1_low": lo, "pass@1_high": hi, "n": len(right),
               "reasons": dict(stats.counts),
               "examples": [{"prompt": it.messages[-1]["content"][:120], "reply": text[:200], "answer": it.answer}
                            for it, text in greedy[:3]]}
        if k > 0:
            sampled = replies(k, temperature, seed)
            any_right: dict[str, bool] = {}
            for it, text in sampled:
                any_right[it.id] = any_right.get(it.id, False) or task.reward(text, it)[1] == "correct"
            res["pass@k"], res["k"] = sum(any_right.values()) / max(1, len(any_right)), k
        return res
    finally:
        engine.model.train(was)
