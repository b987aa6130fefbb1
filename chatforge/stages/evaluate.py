"""`chatforge eval [SOURCE]` (or `evaluate`): score a run's checkpoints, one eval.json each.

    chatforge eval --run tiny                      # every stage checkpoint of the run (pretrain, sft, ...)
    chatforge eval pretrain --run tiny --limit 50  # one stage, 50 examples per task
    chatforge eval runs/x/sft/checkpoint --run x --tasks gsm8k,humaneval
    chatforge eval --tasks list                    # the task names and groups

Outputs in runs/<run>/eval/<label>/ (label: base for pretrain, else the stage name): eval.json (the
numbers, rewritten after every task so an interruption keeps what finished), config.json,
meta.json, metrics.jsonl (one record per task) and DONE. A rerun keeps every finished task whose
checkpoint and settings are unchanged (so it resumes an interrupted evaluation, and `--tasks X` adds
X to an existing eval.json); --force evaluates everything again. The library is chatforge/evaluate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.common import ChatforgeError, log0, setup_threads, stage_dir, stage_run
from chatforge.evaluate import evaluate_checkpoint, identity_card, list_tasks
from chatforge.report import CHECKPOINT_STAGES


def targets(cfg) -> list[tuple[str, Path]]:
    """(label, checkpoint folder) pairs to evaluate, from --source."""
    root = Path(cfg.runs_dir) / cfg.run
    by_stage = {stage: label for label, stage in CHECKPOINT_STAGES}
    source = dict(CHECKPOINT_STAGES).get(cfg.source, cfg.source) if cfg.source not in by_stage else cfg.source
    if source in by_stage:  # a stage (rl) or its label (rlhf -> rlhf/dpo)
        ck = root / source / "checkpoint"
        if not (ck / "config.json").exists():
            raise ChatforgeError(f"run '{cfg.run}' has no {cfg.source} checkpoint ({ck} not found); "
                                 f"{_have(root)}")
        return [(by_stage[source], ck)]
    if cfg.source:
        ck = Path(cfg.source).expanduser()
        if not (ck / "config.json").exists():
            raise ChatforgeError(f"{cfg.source}: not a stage name ({', '.join(by_stage)}) nor a checkpoint folder "
                                 f"(no config.json there); {_have(root)}")
        stage = json.loads((ck / "config.json").read_text()).get("stage")
        return [(by_stage.get(stage, stage or ck.resolve().parent.name), ck)]  # runs/x/sft/checkpoint -> sft
    found = [(label, root / stage / "checkpoint") for label, stage in CHECKPOINT_STAGES
             if (root / stage / "checkpoint" / "config.json").exists()]
    if not found:
        raise ChatforgeError(f"run '{cfg.run}' has no checkpoints yet ({_have(root)}); run `chatforge pretrain "
                             f"--run {cfg.run}` first, or give a checkpoint folder")
    return found


def _have(root: Path) -> str:
    have = [f"{stage} ({root / stage / 'checkpoint'})" for _, stage in CHECKPOINT_STAGES
            if (root / stage / "checkpoint" / "config.json").exists()]
    return "checkpoints there: " + (", ".join(have) if have else "none")


def run(cfg) -> dict:
    if cfg.tasks == ["list"]:
        log0(list_tasks())
        return {}
    for name in ("limit", "probe_n"):
        if getattr(cfg, name) < 0:
            raise ChatforgeError(f"--{name} {getattr(cfg, name)}: must be 0 or more")
    for name in ("batch_size", "max_tokens", "bpb_tokens"):
        if getattr(cfg, name) < 1:
            raise ChatforgeError(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.python_timeout <= 0:
        raise ChatforgeError(f"--python_timeout {cfg.python_timeout}: must be positive")
    setup_threads(cfg.threads)
    root = Path(cfg.runs_dir) / cfg.run
    # The identity SFT taught (its config's identity card, else the defaults) and the facts stage's
    # fictional people (known / withheld), when this run has them: files of those stages, read here.
    sft_config = root / "sft" / "config.json"
    try:
        card = identity_card(json.loads(sft_config.read_text(encoding="utf-8")) if sft_config.exists() else None)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ChatforgeError(f"{sft_config}: cannot read the identity card SFT used ({e}); fix or delete the file "
                             f"(the identity probe then expects the default card)") from None
    facts = root / "facts" / "facts.jsonl"
    summary = {}
    for label, ck in targets(cfg):
        out = stage_dir(cfg, f"eval/{label}")
        log0(f"eval: {label}: {ck}")
        with stage_run(cfg, f"eval/{label}") as srun:
            result = evaluate_checkpoint(
                ck, cfg.tasks, out / "eval.json", label=label, data_dir=cfg.data_dir, limit=cfg.limit, seed=cfg.seed,
                batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, tokens_dir=root / "pretrain" / "tokens",
                bpb_text=cfg.bpb_text, bpb_tokens=cfg.bpb_tokens, python_timeout=cfg.python_timeout,
                probe_n=cfg.probe_n, identity_card=card, facts=facts if facts.exists() else None, device=cfg.device,
                dtype=cfg.dtype, force=cfg.force, log=log0)
            for name, res in result["tasks"].items():
                srun.log(event="task", task=name, **{k: v for k, v in res.items()
                                                     if isinstance(v, (int, float, str, bool)) or v is None})
            core = result["core"]
            summary[label] = {"checkpoint": str(ck), "eval": str(out / "eval.json"),
                              "core": core["score"] if core else None,
                              "tasks": {n: r.get("accuracy", r.get("bpb")) for n, r in result["tasks"].items()
                                        if r.get("status") == "ok"}}
            srun.finish(summary[label])
        if core:
            log0(f"eval: {label}: CORE {core['score']:.4f} over {len(core['tasks'])} task(s)"
                 + (f" (missing: {', '.join(core['missing'])})" if core["missing"] else ""))
        log0(f"eval: {label}: wrote {out / 'eval.json'}")
    return summary

