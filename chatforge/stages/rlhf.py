"""`chatforge rlhf ACTION`: learning from human preferences, after RL.

    chatforge rlhf rm  --preset tiny        # reward model on HH, OASST and the controlled sets, from runs/tiny/sft
    chatforge rlhf dpo --preset tiny        # DPO of the policy (runs/tiny/rl, else sft) on preference pairs
    chatforge rlhf --preset tiny            # both (the pipeline's step)
    chatforge rlhf judge --preset tiny      # a second reward model on the disjoint judge split
    chatforge rlhf grpo --preset tiny       # GRPO against the reward model, KL leash, the judge watching
    chatforge rlhf ppo --preset tiny        # PPO (value head, GAE, KL penalty in the reward), the judge watching
    chatforge rlhf score --run tiny --prompt "What is 2 + 2?" --replies "It is 4.||Figure it out yourself."

Wiring only: the pairs (tasks/preferences.py, pairs.py), the reward model (reward_model.py), DPO (dpo.py),
GRPO and PPO on the reward model and the reward-hacking monitor (rlhf_grpo.py over grpo.py and ppo.py),
LoRA (lora.py), the one training loop (train_loop.py), the actions' shared setup (rlhf_setup.py).

Outputs in runs/<run>/rlhf/:

    rm/checkpoint/     the reward model: backbone checkpoint + reward_head.safetensors ("reward_model": true)
    rm/summary.json    held-out pairwise accuracy per source with its 95% Wilson interval, pair counts and
                       skip reasons (also in rm/DONE); rm/metrics.jsonl per step (loss, accuracy, margin)
    dpo/checkpoint/    the DPO policy: the run's "rlhf" checkpoint (`chatforge chat runs/<run>/rlhf/dpo/checkpoint`)
    dpo/summary.json   before / after per source: implicit reward margin, preferred-reply rate (95% interval),
                       preferred-logprob rate; dpo/metrics.jsonl per step
    judge/             the judge reward model (same layout as rm/, trained on the judge split)
    grpo/checkpoint/   the GRPO policy; grpo/best/ the policy where the judge scored best; grpo/hacking.png
                       the training reward, KL, held-out reward model and judge curves; grpo/monitor.json
    ppo/               the same for PPO; ppo/checkpoint/ also holds the value head (value_head.safetensors)
    DONE               when rm and dpo are complete
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from chatforge.common import ChatforgeError, is_complete, log0, read_done, source_checkpoint, stage_dir, stage_run, \
    write_json
from chatforge.config import RlhfConfig
from chatforge.distributed import training_process
from chatforge.rlhf_setup import amp_dtype, check_config, flat, load_pair_data, loop_config, policy_source, \
    prepare_action, schedule
from chatforge.stats import pooled


def run(cfg: RlhfConfig) -> dict:
    check_config(cfg)
    if cfg.action == "score":
        return score(cfg)
    out = {}
    with training_process(cfg.threads, cfg.device) as (d, device):
        for action in (("rm", "dpo") if cfg.action == "all" else (cfg.action,)):
            train = {"rm": _train_rm, "judge": _train_rm, "dpo": _train_dpo, "grpo": _train_policy, "ppo": _train_policy}
            out[action] = train[action](cfg, d, device, action)
    root = stage_dir(cfg, "rlhf")
    if d.master and all(is_complete(root / a) for a in ("rm", "dpo")):
        parts = {a: read_done(root / a) for a in ("rm", "dpo")}
        write_json(root / "DONE", {"stage": "rlhf", "seconds": sum(p.get("seconds", 0) for p in parts.values()), **parts})
    return out


def _train_rm(cfg, d, device, kind: str = "rm") -> dict:
    """The reward model (kind "rm", on the train split) or the judge (kind "judge", on the disjoint judge split)."""
    from chatforge.lora import lora_parameters
    from chatforge.pairs import PairSource
    from chatforge.reward_model import RewardCheckpointer, build_reward_model, describe, pair_accuracy, rm_loss
    from chatforge.rng import seed_everything
    from chatforge.train_loop import Trainer, prepare_model

    src = source_checkpoint(cfg, cfg.rm_source)
    out, tok, tok_dir, resume = prepare_action(cfg, d, kind, src)
    if tok is None:
        return read_done(out)
    seed_everything(cfg.seed)
    rm, info = build_reward_model(src, out / "checkpoint", resume=resume, lora_rank=cfg.lora_rank,
                                  lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets, seq_len=cfg.max_seq_len)
    max_len = cfg.max_seq_len or rm.config.max_seq_len
    with (stage_run(cfg, f"rlhf/{kind}") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        log0(f"rlhf {kind}: reward model from {src}, pairs of {', '.join(cfg.rm_data)} (<= {max_len} tokens):")
        pairs, val, counts = load_pair_data(cfg, tok, cfg.rm_data, max_len, log, "train" if kind == "rm" else "judge")
        rm = rm.to(device)
        # LoRA: the adapters at --lora_lr and the head at --rm_lr; else everything but the unused LM head at
        # --rm_lr. initial_lr: the schedule's base, saved and resumed with the optimizer.
        adapters = lora_parameters(rm.backbone) if cfg.lora_rank else []
        groups = [(adapters, cfg.lora_lr), (list(rm.head.parameters()), cfg.rm_lr)] if adapters else \
            [([p for p in rm.parameters() if p.requires_grad], cfg.rm_lr)]
        opt = torch.optim.AdamW([{"params": ps, "lr": lr, "initial_lr": lr} for ps, lr in groups], betas=(0.9, 0.95),
                                weight_decay=0.0)

        def evaluate(t) -> dict:
            r = {n: pair_accuracy(rm, v, tok.bos_id, cfg.batch_size, device) for n, v in val.items()}
            t.write(f"step {t.state.step:,}: held-out accuracy " + ", ".join(f"{n} {x['accuracy']:.1%}" for n, x in r.items()))
            return dict(flat(r), accuracy=pooled(r, "accuracy"))

        ck = RewardCheckpointer(out / "checkpoint", tokenizer_dir=tok_dir,
                                meta={"stage": "rlhf", "action": kind, "run": cfg.run, "source": str(src)})
        trainer = Trainer(prepare_model(rm, d, device), opt, rm_loss,
                          PairSource(pairs, cfg.batch_size, tok.bos_id, cfg.seed + d.rank, device),
                          loop_config(cfg, cfg.rm_steps, "accuracy", f"rlhf {kind}"), dist=d, device=device, amp_dtype=amp_dtype(cfg, device),
                          evaluate=evaluate if d.master else None, checkpointer=ck, log=log,
                          lr_schedule=schedule(cfg, cfg.rm_steps))
        if resume:
            trainer.resume(info)
        state = trainer.run()
        if not d.master:
            return {}
        after = {n: pair_accuracy(rm, v, tok.bos_id, cfg.batch_size, device) for n, v in val.items()}
        summary = {"source": str(src), "steps": state.step, "train_seconds": round(state.train_time, 1),
                   "accuracy": after, "pairs": counts, "checkpoint": str(out / "checkpoint")}
        log(event="after", **flat(after))
        write_json(out / "summary.json", summary)
        srun.finish(summary)
        log0(f"rlhf {kind} done: {state.step} steps in {state.train_time:.0f} s; held-out pairwise accuracy:\n"
             + describe(after))
        return summary


def _train_dpo(cfg, d, device, action: str = "dpo") -> dict:
    from chatforge.dpo import describe, dpo_train_loss, evaluate_dpo, load_policy
    from chatforge.finetune import AdapterCheckpointer, sft_optimizer
    from chatforge.pairs import PairSource
    from chatforge.reward_model import check_tokenizers
    from chatforge.rng import seed_everything
    from chatforge.tokenizer import Tokenizer
    from chatforge.train_loop import Checkpointer, Trainer, prepare_model

    src = policy_source(cfg)
    out, tok, tok_dir, resume = prepare_action(cfg, d, action, src)
    if tok is None:
        return read_done(out)
    rm_tok = stage_dir(cfg, "rlhf/rm") / "checkpoint" / "tokenizer"
    if rm_tok.is_dir():  # the reward model judges this policy's replies later: same ids or nothing
        check_tokenizers(Tokenizer.load(rm_tok), tok, rm_tok.parent, src)
    seed_everything(cfg.seed)
    lora = cfg.lora_rank > 0
    ck_path = out / "checkpoint"
    model, reference, info = load_policy(src, ck_path, resume=resume, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                         lora_targets=cfg.lora_targets, seq_len=cfg.max_seq_len, device=device)
    max_len = cfg.max_seq_len or model.config.max_seq_len
    with (stage_run(cfg, "rlhf/dpo") if d.master else contextlib.nullcontext()) as srun:
        log = srun.log if srun is not None else (lambda **r: None)
        log0(f"rlhf dpo: policy {src} ({'LoRA rank ' + str(cfg.lora_rank) if lora else 'full'}, beta {cfg.beta}), "
             f"pairs of {', '.join(cfg.dpo_data)}:")
        pairs, val, counts = load_pair_data(cfg, tok, cfg.dpo_data, max_len, log)

        def measure():
            return {n: evaluate_dpo(model, reference, v, tok.bos_id, cfg.beta, cfg.batch_size, device) for n, v in val.items()}

        summary = {"source": str(src), "beta": cfg.beta, "nll_coef": cfg.nll_coef, "lora_rank": cfg.lora_rank,
                   "pairs": counts}
        if d.master:
            if resume and (out / "before.json").exists():
                summary["before"] = json.loads((out / "before.json").read_text())
            else:
                summary["before"] = measure()
                write_json(out / "before.json", summary["before"])
                log(event="before", **flat(summary["before"]))
        opt = sft_optimizer(model, lora=lora, lr_frac=cfg.lr_frac, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                            unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr, lora_lr=cfg.lora_lr)

        def evaluate(t) -> dict:
            r = measure()
            t.write(f"step {t.state.step:,}: held-out " + ", ".join(
                f"{n} margin {x['margin']:.3f} preferred {x['implicit_accuracy']:.1%}" for n, x in r.items()))
            return dict(flat(r), implicit_accuracy=pooled(r, "implicit_accuracy"))

        kind = AdapterCheckpointer if lora else Checkpointer
        ck = kind(ck_path, tokenizer_dir=tok_dir, meta={"stage": "rlhf", "action": "dpo", "run": cfg.run,
                                                        "source": str(src)},
                  extra_state={"lora_rank": cfg.lora_rank, "source": str(src)})
        trainer = Trainer(prepare_model(model, d, device), opt, dpo_train_loss(cfg.beta, cfg.nll_coef, reference),
                          PairSource(pairs, cfg.batch_size, tok.bos_id, cfg.seed + d.rank, device),
                          loop_config(cfg, cfg.dpo_steps, "implicit_accuracy", "rlhf dpo"), dist=d, device=device,
                          amp_dtype=amp_dtype(cfg, device), evaluate=evaluate if d.master else None, checkpointer=ck,
                          log=log, lr_schedule=schedule(cfg, cfg.dpo_steps))
        if resume:
            trainer.resume(info)
        state = trainer.run()
        if not d.master:
            return {}
        summary.update(after=measure(), steps=state.step, train_seconds=round(state.train_time, 1), checkpoint=str(ck_path))
        log(event="after", **flat(summary["after"]))
        write_json(out / "summary.json", summary)
        srun.finish(summary)
        log0(f"rlhf dpo done: {state.step} steps in {state.train_time:.0f} s; checkpoint {ck_path}; held-out:\n"
             + describe(summary["before"], summary["after"]))
        return summary


def _train_policy(cfg, d, device, algo: str) -> dict:
    """GRPO (grpo.py) or PPO (ppo.py) with the reward model's score as the reward, a KL leash to the starting
    policy, and the judge watching for reward hacking (rlhf_grpo.HackingWatch)."""
    from chatforge.dpo import load_policy
    from chatforge.engine import Engine
    from chatforge.finetune import AdapterCheckpointer, sft_optimizer
    from chatforge.grpo import GrpoSettings, RolloutSource, grpo_loss
    from chatforge.lora import AdaptersOff
    from chatforge.ppo import PpoSettings, PpoSource, ValueCheckpointer, ppo_loss, ppo_optimizer, with_value_head
    from chatforge.rlhf_grpo import HackingWatch, RewardModelTask, load_judged_reward_models, load_prompts, \
        plot_hacking
    from chatforge.rng import seed_everything
    from chatforge.train_loop import Checkpointer, Trainer, prepare_model

    src = policy_source(cfg)
    out, tok, tok_dir, resume = prepare_action(cfg, d, algo, src)
    if tok is None:
        return read_done(out)
    rms = load_judged_reward_models(Path(cfg.runs_dir) / cfg.run, tok, src, device)  # frozen, tokenizers checked
    seed_everything(cfg.seed)
    lora = cfg.lora_rank > 0
    policy, ref, info = load_policy(src, out / "checkpoint", resume=resume, lora_rank=cfg.lora_rank,
                                    lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets, seq_len=cfg.max_seq_len,
                                    device=device)
    ref = AdaptersOff(policy) if lora else ref  # LoRA: the KL reference is the base weights, adapters off
    room = min(policy.config.max_seq_len, cfg.max_seq_len or policy.config.max_seq_len) - cfg.max_tokens
    items = load_prompts(cfg.grpo_data, tok, room, cfg.eval_prompts, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                         judge_fraction=cfg.judge_fraction, seed=cfg.seed, controlled_n=cfg.controlled_pairs)
    task = RewardModelTask(rms["rm"], tok, items, cfg.max_seq_len)
    engine = Engine(policy, tok, tools={}, device=device)
    rollout = dict(prompts=cfg.prompts_per_step, group_size=cfg.group_size, micro_batches=cfg.grad_accum,
                   kl_coef=cfg.kl_coef, max_tokens=cfg.max_tokens, temperature=cfg.temperature, use_tools=False,
                   seed=cfg.seed + 7919 * d.rank)
    kw = dict(device=device, say=log0)
    opt = sft_optimizer(policy, lora=lora, lr_frac=cfg.lr_frac, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                        unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr, lora_lr=cfg.lora_lr)
    meta = {"stage": "rlhf", "action": algo, "run": cfg.run, "source": str(src)}
    if algo == "ppo":  # the policy with a value head on its trunk; ppo_epochs optimizer steps per rollout
        model = with_value_head(policy, out / "checkpoint" if resume else None)
        settings = PpoSettings(**rollout, epochs=cfg.ppo_epochs, cliprange=cfg.clip, value_clip=cfg.clip,
                               gamma=cfg.gamma, lam=cfg.lam, vf_coef=cfg.vf_coef)
        # the reference even with kl_coef 0: the monitor's KL curve and --kl_budget read it
        source = PpoSource(engine, tok, task, items["train"], settings, policy=model, ref_model=ref,
                           amp_dtype=amp_dtype(cfg, device), **kw)
        opt, loss_fn = ppo_optimizer(opt, model, cfg.value_lr), ppo_loss(settings)
        ck = ValueCheckpointer(out / "checkpoint", tokenizer_dir=tok_dir, meta=meta)
        rollouts, per_rollout = cfg.ppo_steps, cfg.ppo_epochs
    else:
        model, settings = policy, GrpoSettings(**rollout)
        source = RolloutSource(engine, tok, task, items["train"], settings, ref_model=ref if cfg.kl_coef else None, **kw)
        loss_fn = grpo_loss(settings)
        ck = (AdapterCheckpointer if lora else Checkpointer)(out / "checkpoint", tokenizer_dir=tok_dir, meta=meta)
        rollouts, per_rollout = cfg.grpo_steps, 1
    steps = rollouts * per_rollout
    with (stage_run(cfg, f"rlhf/{algo}") if d.master else contextlib.nullcontext()) as srun:
        watch = HackingWatch(out, engine, tok, items["val"], rms, tok_dir, max_tokens=cfg.max_tokens,
                             max_len=cfg.max_seq_len, kl_budget=cfg.kl_budget, patience=cfg.patience, resume=resume,
                             meta={"stage": "rlhf", "action": algo}, log=srun.log if srun is not None else None)
        log0(f"rlhf {algo}: policy {src}, {len(items['train']):,} prompts of {', '.join(cfg.grpo_data)}, "
             f"{cfg.prompts_per_step} x {cfg.group_size} replies per rollout, {rollouts} rollouts"
             f"{f' x {per_rollout} optimizer steps' if per_rollout > 1 else ''}, KL coefficient {cfg.kl_coef}")
        trainer = Trainer(prepare_model(model, d, device), opt, loss_fn, source,
                          loop_config(cfg, steps, "judge_score", f"rlhf {algo}", per_rollout), dist=d, device=device,
                          amp_dtype=amp_dtype(cfg, device), evaluate=watch if d.master else None, checkpointer=ck,
                          log=watch.log, lr_schedule=schedule(cfg, steps))
        if resume:
            trainer.resume(info)
        elif d.master:
            watch.log(event="eval", step=0, **watch(trainer))  # step 0: the starting policy is the first "best"
        state = trainer.run()
        if not d.master:
            return {}
        monitor = watch.monitor
        summary = {"source": str(src), "algo": algo, "steps": state.step, "rollouts": source.rollouts,
                   "optimizer_steps_per_rollout": per_rollout, "kl_coef": cfg.kl_coef, "kl_budget": cfg.kl_budget,
                   "monitor": monitor.state_dict(), "judge_vs_rm": monitor.describe(),
                   "stopped_early": state.step < steps, "best": str(out / "best"),
                   "train_seconds": round(state.train_time, 1), "reward_reasons": dict(source.reward_stats.counts),
                   "checkpoint": str(out / "checkpoint")}
        write_json(out / "summary.json", summary)
        srun.close()
        summary["plot"] = plot_hacking(out / "metrics.jsonl", out / "hacking.png", algo)
        srun.finish(summary)
        log0(f"rlhf {algo} done: {state.step} steps in {state.train_time:.0f} s; held-out reward model and judge: "
             f"{summary['judge_vs_rm']} (best policy by the judge: {out / 'best'})")
        return summary


def score(cfg) -> dict:
    """Score replies to a prompt (or the records of --score_file) with a trained reward model; prints them."""
    from chatforge.reward_model import read_score_records, score_records

    path = Path(cfg.rm) if cfg.rm else stage_dir(cfg, "rlhf/rm") / "checkpoint"
    if not (path / "config.json").is_file():
        raise ChatforgeError(f"no reward model at {path}; train one with `chatforge rlhf rm --run {cfg.run}` or "
                             f"pass --rm CHECKPOINT")
    if cfg.score_file:
        records = read_score_records(cfg.score_file)
    elif cfg.prompt and cfg.replies:
        records = [{"prompt": cfg.prompt, "replies": cfg.replies.split("||")}]
    else:
        raise ChatforgeError("give --prompt TEXT and --replies 'A||B' (or --score_file FILE.jsonl) to score")
    results = score_records(path, records, cfg.max_seq_len)
    for r in results:
        print(f"prompt: {r['prompt']}")
        for reply, s in sorted(zip(r["replies"], r["scores"]), key=lambda x: -x[1]):
            print(f"  {s:+8.3f}  {reply[:100]}")
    return {"rm": str(path), "results": results}
