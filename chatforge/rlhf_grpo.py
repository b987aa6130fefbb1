"""Policy optimisation against a learned reward model (GRPO from grpo.py, PPO from ppo.py), and the
reward-hacking monitor that watches both.

The RL stage's GRPO samples groups of replies and learns from group-relative rewards; here the reward of
a reply is the reward model's score instead of a verifier's verdict (`RewardModelTask`: an RLTask whose
`reward` asks the reward model). PPO reads the same task. A per-token KL to the frozen starting policy
(`kl_coef`: GRPO's k3 term in the loss, PPO's penalty in the reward) is the leash of InstructGPT
(https://arxiv.org/abs/2203.02155): without it the policy drifts to whatever the reward model over-scores.

Reward hacking is expected (Gao et al. 2022, https://arxiv.org/abs/2210.10760: the proxy score keeps
rising while the true one peaks and falls), so `HackingMonitor` watches three curves at every
evaluation: the training reward model's mean score of greedy replies to held-out prompts, the KL to the
reference, and the score of a second reward model trained on a disjoint split (the held-out judge). It
keeps the step where the judge was best and calls for an early stop when the judge has fallen `patience`
evaluations in a row below its best by more than `tolerance` while the training reward model's score is
higher than it was then (the two diverge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chatforge.tasks.rl import RLItem, RLTask


class RewardModelTask(RLTask):
    """An RLTask scored by a reward model: reward(reply, item) = the model's score of `reply` to
    `item.messages` (reason "scored", or "empty" / "too_long" for 0). Items are prompts; no answer."""

    def __init__(self, rm, tok, items: dict[str, list[RLItem]], max_len: int = 0, name: str = "reward_model"):
        super().__init__(name, load=lambda split, data_dir, n, seed: items[split], extract=lambda r: r,
                         check=lambda r, a: False)
        self.rm, self.tok, self.max_len = rm, tok, max_len or rm.config.max_seq_len

    @torch.no_grad()
    def reward(self, reply: str, item: RLItem) -> tuple[float, str]:
        from chatforge.common import ChatforgeError
        from chatforge.reward_model import score_replies

        if not isinstance(reply, str) or not reply.strip():
            return 0.0, "empty"
        try:
            device = next(self.rm.parameters()).device
            return score_replies(self.rm, self.tok, item.messages, [reply.strip()], self.max_len, device)[0], "scored"
        except ChatforgeError:
            return 0.0, "too_long"


def prompt_items(pairs, split: str, tok=None, max_prompt: int = 0) -> list[RLItem]:
    """The distinct prompts of preference pairs as RL items (one per conversation, first seen first); with
    `tok` and max_prompt, only prompts of at most max_prompt tokens (room for the reply in the context)."""
    seen, out = set(), []
    for p in pairs:
        key = repr(p.prompt)
        if key in seen:
            continue
        seen.add(key)
        if tok is not None and max_prompt and len(tok.render_prompt(p.prompt)) > max_prompt:
            continue
        out.append(RLItem(f"{split}/{p.id}", p.prompt, ""))
    return out


def load_judged_reward_models(run_dir, tok, policy_path, device="cpu") -> dict:
    """{"rm": the training reward model, "judge": the held-out judge} from <run_dir>/rlhf/{rm,judge}/checkpoint,
    frozen, on `device`. A missing one, or one whose tokenizer is not the policy's, is a clear error."""
    from pathlib import Path

    from chatforge.common import ChatforgeError
    from chatforge.reward_model import check_tokenizers, load_reward_model
    from chatforge.tokenizer import Tokenizer

    rms = {}
    for kind in ("rm", "judge"):
        path = Path(run_dir) / "rlhf" / kind / "checkpoint"
        if not (path / "config.json").is_file():
            raise ChatforgeError(f"rlhf grpo needs the {kind} reward model ({path} missing); run `chatforge rlhf "
                                 f"{kind} --run {Path(run_dir).name}` first")
        rm, info = load_reward_model(path, device)
        check_tokenizers(Tokenizer.load(info["tokenizer_dir"]), tok, path, policy_path)
        rms[kind] = rm.eval().requires_grad_(False)
    return rms


def load_prompts(names: list[str], tok, room: int, eval_prompts: int, **split_kw) -> dict[str, list[RLItem]]:
    """{"train", "val"}: the distinct prompts of the preference sources `names` that leave room for a reply
    (at most `room` tokens), at most eval_prompts held out. split_kw: load_pairs' split settings."""
    from chatforge.common import ChatforgeError
    from chatforge.tasks.preferences import load_pairs

    items = {s: prompt_items([p for n in names for p in load_pairs(n, s, **split_kw)], s, tok, room)
             for s in ("train", "val")}
    items["val"] = items["val"][:eval_prompts]
    if not items["train"] or not items["val"]:
        raise ChatforgeError(f"rlhf grpo: {len(items['train'])} training and {len(items['val'])} held-out prompts of "
                             f"{', '.join(names)} fit {room} tokens; raise --max_seq_len or lower --max_tokens")
    return items


def plot_hacking(metrics, png, algo: str = "grpo") -> str | None:
    """The monitor's curves side by side: training reward (per step), KL to the reference (per step), and the
    held-out reward model's and the judge's scores in one panel (per evaluation), so a divergence shows as
    two lines parting (two models' scores have no common unit: compare their shapes). None without matplotlib."""
    try:
        from chatforge.plots import plot_metrics
    except ImportError:
        return None
    return str(plot_metrics(metrics, png, ["reward", "kl", ["eval/rm_score", "eval/judge_score"]],
                            title=f"{algo.upper()} on the reward model: training RM, KL, held-out RM vs judge"))


@torch.no_grad()
def mean_score(rm, tok, items: list[RLItem], replies: list[str], max_len: int = 0) -> float:
    """A reward model's mean score of replies[i] to items[i] (held-out greedy replies)."""
    task = RewardModelTask(rm, tok, {}, max_len)
    scores = [task.reward(r, it)[0] for it, r in zip(items, replies)]
    return sum(scores) / max(1, len(scores))


@torch.no_grad()
def held_out_scores(engine, tok, items: list[RLItem], rms: dict, max_tokens: int, max_len: int = 0) -> dict:
    """Greedy replies of the engine's model to held-out prompts, scored by each reward model in `rms`
    ({"rm": ..., "judge": ...}) -> {"rm_score": mean, "judge_score": mean}."""
    from chatforge.grpo import reply_text

    was = engine.model.training
    engine.model.eval()
    try:
        comps = engine.generate([tok.render_prompt(it.messages) for it in items], max_tokens=max_tokens,
                                temperature=0.0, use_tools=False)
    finally:
        engine.model.train(was)
    replies = [reply_text(tok, c) for c in sorted(comps, key=lambda c: c.prompt_index)]
    return {f"{k}_score": mean_score(rm, tok, items, replies, max_len) for k, rm in rms.items()}


@dataclass
class HackingMonitor:
    """Decides, evaluation by evaluation, whether the training reward and the judge diverge (see above)."""

    patience: int = 2
    tolerance: float = 0.0
    best_judge: float | None = None
    best_step: int = -1
    rm_at_best: float = float("nan")
    falling: int = 0
    history: list[dict] = field(default_factory=list)

    def update(self, step: int, rm_score: float, judge_score: float) -> dict:
        """Record one evaluation; returns {"improved": the judge's best so far, "stop": diverged}."""
        self.history.append({"step": step, "rm_score": rm_score, "judge_score": judge_score})
        if self.best_judge is None or judge_score > self.best_judge:
            self.best_judge, self.best_step, self.rm_at_best, self.falling = judge_score, step, rm_score, 0
            return {"improved": True, "stop": False}
        diverging = judge_score < self.best_judge - self.tolerance and rm_score > self.rm_at_best
        self.falling = self.falling + 1 if diverging else 0
        return {"improved": False, "stop": self.falling >= self.patience}

    def describe(self) -> str:
        """One line on whether the reward model and the judge agreed over the run (for the summary and the log)."""
        if not self.history:
            return "no evaluation"
        first, last = self.history[0], self.history[-1]
        moves = (f"reward model {first['rm_score']:.3f} -> {last['rm_score']:.3f}, judge {first['judge_score']:.3f} "
                 f"-> {last['judge_score']:.3f} (steps {first['step']} -> {last['step']})")
        if last["judge_score"] < self.best_judge - self.tolerance and last["rm_score"] > self.rm_at_best:
            return (f"they disagree: after step {self.best_step} the reward model rose ({self.rm_at_best:.3f} -> "
                    f"{last['rm_score']:.3f}) while the judge fell ({self.best_judge:.3f} -> {last['judge_score']:.3f}), "
                    f"reward hacking; the policy kept as best is step {self.best_step}'s. Overall: {moves}")
        if self.best_step == last["step"]:
            return f"they agree: the judge is at its best at the last evaluation. Overall: {moves}"
        return (f"no divergence: the judge is below its best (step {self.best_step}) but the reward model did not "
                f"rise past its score then. Overall: {moves}")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best_judge", "best_step", "rm_at_best", "falling", "history")}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class HackingWatch:
    """The evaluate callback (train_loop.Trainer's `evaluate`) of `rlhf grpo` and `rlhf ppo`, and the log that
    feeds it the per-step KL. At each evaluation: greedy replies to the held-out prompts scored by the reward
    model and the judge (held_out_scores), the monitor's verdict, the mean per-token KL since the last
    evaluation against `kl_budget` (0 = none), the policy saved to <out>/best when the judge is at its best,
    and on a stop (divergence or budget) the loop told to end after one more step (checkpoint included).
    The monitor's state is written to <out>/monitor.json (and read back on a resume)."""

    def __init__(self, out, engine, tok, items, rms: dict, tokenizer_dir, *, max_tokens: int, max_len: int = 0,
                 kl_budget: float = 0.0, patience: int = 2, resume: bool = False, meta: dict | None = None,
                 log=None):
        import json
        from pathlib import Path

        self.out, self.engine, self.tok, self.items, self.rms = Path(out), engine, tok, items, rms
        self.tokenizer_dir, self.max_tokens, self.max_len, self.kl_budget = tokenizer_dir, max_tokens, max_len, kl_budget
        self.meta, self._log = dict(meta or {}), log or (lambda **r: None)
        self.monitor = HackingMonitor(patience=patience or 10 ** 9)
        if resume and (self.out / "monitor.json").exists():
            self.monitor.load_state_dict(json.loads((self.out / "monitor.json").read_text()))
        self.kls: list[float] = []  # per-step KL since the last evaluation, for kl_budget

    def log(self, **r) -> None:
        """The trainer's log: records go on to metrics.jsonl; a step's "kl" is kept for the budget."""
        if "kl" in r and "event" not in r:
            self.kls.append(r["kl"])
        self._log(**r)

    def __call__(self, t) -> dict:
        from chatforge.checkpoint import save_checkpoint
        from chatforge.common import write_json
        from chatforge.lora import merged_state_dict
        from chatforge.train_loop import _FullWeights

        r = held_out_scores(self.engine, self.tok, self.items, self.rms, self.max_tokens, self.max_len)
        verdict = self.monitor.update(t.state.step, r["rm_score"], r["judge_score"])
        write_json(self.out / "monitor.json", self.monitor.state_dict())
        if self.kls:
            r["kl_since_eval"] = sum(self.kls) / len(self.kls)
            self.kls.clear()
            if self.kl_budget and r["kl_since_eval"] > self.kl_budget:
                t.write(f"step {t.state.step}: KL {r['kl_since_eval']:.4f} is over the budget {self.kl_budget}: stopping")
                verdict["stop"] = True
        if verdict["improved"]:  # keep the best policy by the judge
            model = self.engine.model
            save_checkpoint(self.out / "best", _FullWeights(model.config, merged_state_dict(model)),
                            tokenizer_dir=self.tokenizer_dir, meta={**self.meta, "step": t.state.step, **r})
        if verdict["stop"] and self.monitor.falling >= self.monitor.patience:
            t.write(f"step {t.state.step}: the judge fell {self.monitor.falling} evaluations in a row while the reward "
                    f"model rose: stopping (best judge at step {self.monitor.best_step})")
        if verdict["stop"]:
            t.config.num_steps = min(t.config.num_steps, t.state.step + 1)  # finish this step, checkpoint, end
        t.write(f"step {t.state.step:,}: held-out reward model {r['rm_score']:.3f}, judge {r['judge_score']:.3f}")
        return dict(r, stopped_early=float(verdict["stop"]))
