"""`chatforge speedrun`: every pipeline stage in order on one preset, skipping complete stages, then
the report card (printed by the report stage) and the commands to chat with and serve the result.

Each stage gets the preset, the optional TOML file's [<stage>] section, and the shared settings given
here (run, runs_dir, data_dir, device, threads, seed, force), in that order of precedence. A stage
that is already complete (its DONE marker exists) returns at once, so a killed speedrun resumes
where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import time
from pathlib import Path

from chatforge.common import ChatforgeError, is_complete, log0, stage_dir
from chatforge.config import PIPELINE, STAGE_CONFIGS, CommonConfig, SpeedrunConfig, resolve_config
from chatforge.hardware import cpu_busy_share
from chatforge.report import latest_checkpoint


# Seconds each stage took on a quiet 2-core Intel Xeon VM with AMX (README command 1 in a fresh clone for
# tiny, 2026-12-02, pretraining in bf16; the laptop preset: pretraining from its first, float32 run divided
# by the 1.52x bf16 measured on tiny, the rest from its second run, one SFT pass):
# the progress line's estimate of the time left scales these by how long the stages run so far took
# against their entry. GPU presets show the elapsed time only (their stages print their own ETAs).
STAGE_SECONDS = {
    "tiny": {"data": 13, "facts": 1, "tokenizer": 2, "pretrain": 481, "index": 1, "sft": 194, "rl": 293,
             "rlhf": 166, "evaluate": 19, "report": 1},
    "laptop": {"data": 14, "facts": 1, "tokenizer": 2, "pretrain": 1290, "index": 1, "sft": 204, "rl": 656,
               "rlhf": 316, "evaluate": 46, "report": 1},
}
TINY_SECONDS = STAGE_SECONDS["tiny"]
# Stages that are not skipped when complete: they keep their finished parts and redo the rest.
ALWAYS_RUN = ("evaluate", "report")


def run(cfg: SpeedrunConfig) -> dict | None:
    stages = plan_stages(cfg)
    # Only the shared settings the user actually changed from their defaults are passed on, so a
    # preset's own `run` name is kept unless --run was given.
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig)
              if getattr(cfg, f.name) != f.default}
    redo = set(stages if cfg.force else ())
    if cfg.only:
        redo = {cfg.only}
    elif cfg.from_stage:
        redo = set(stages[stages.index(cfg.from_stage):])
    configs = {name: resolve_config(STAGE_CONFIGS[name], stage=name, preset=cfg.preset, config_file=cfg.config or None,
                                    overrides={**common, "force": name in redo})
               for name in stages}
    done = {name: name not in ALWAYS_RUN and name not in redo and is_complete(stage_dir(c, name))
            for name, c in configs.items()}
    if cfg.dry_run:
        log0(describe(cfg, stages, configs, done))
        return None
    note = busy_note(cpu_busy_share(), os.cpu_count() or 1)
    if note:
        log0(note)
    summary = {}
    t0 = time.time()
    ran_s = expected_s = 0.0  # stages that did work: seconds taken, and STAGE_SECONDS' for them
    table = STAGE_SECONDS.get(cfg.preset, {})
    for i, name in enumerate(stages, 1):
        stage_cfg = configs[name]
        left = eta(cfg.preset, [s for s in stages[i - 1:] if not done[s]], ran_s, expected_s)
        log0(f"\n=== speedrun: stage {i}/{len(stages)} {name} (run '{stage_cfg.run}', preset {cfg.preset}); "
             f"elapsed {fmt_s(time.time() - t0)}{left} ===")
        t = time.time()
        summary[name] = importlib.import_module(f"chatforge.stages.{name}").run(stage_cfg)
        took = time.time() - t
        if not done[name] and name in table:
            ran_s, expected_s = ran_s + took, expected_s + table[name]
        log0(f"=== speedrun: {name} {'was complete' if done[name] else 'done'} in {took:.1f}s ===")
    log0(f"\nspeedrun: {len(summary)} stage(s) complete in {time.time() - t0:.1f}s")
    if summary:
        log0(next_steps(Path(stage_cfg.runs_dir) / stage_cfg.run))
    return summary


def plan_stages(cfg: SpeedrunConfig) -> list[str]:
    """The stages this speedrun runs, in pipeline order; a bad name is one error listing the pipeline."""
    asked = cfg.stages or PIPELINE
    for flag, names in (("--stages", asked), ("--from", [cfg.from_stage] if cfg.from_stage else []),
                        ("--only", [cfg.only] if cfg.only else [])):
        unknown = [s for s in names if s not in PIPELINE]
        if unknown:
            raise ChatforgeError(f"{flag}: unknown stage(s) {', '.join(unknown)}; pipeline: {', '.join(PIPELINE)}")
    if cfg.only:
        return [cfg.only]
    stages = [s for s in PIPELINE if s in asked]
    if cfg.from_stage and cfg.from_stage not in stages:
        raise ChatforgeError(f"--from {cfg.from_stage}: not among the stages run ({', '.join(stages)})")
    return stages


def eta(preset: str, pending: list[str], ran_s: float, expected_s: float) -> str:
    """', about N min left' from STAGE_SECONDS (the CPU presets), scaled by this machine's pace so far."""
    table = STAGE_SECONDS.get(preset)
    if not table or not pending:
        return ""
    pace = min(3.0, max(0.3, ran_s / expected_s)) if expected_s >= 20 else 1.0
    return f", about {fmt_s(pace * sum(table.get(s, 0) for s in pending))} left"


def busy_note(busy_share: float | None, cores: int) -> str | None:
    """A warning when other jobs already use the CPU: the estimates (and README's times) assume quiet
    cores, and on 2 cores one other busy process makes training stages about twice as slow (measured:
    pretraining beside the test suite took 664 s against 382 s quiet, README command 1)."""
    busy = (busy_share or 0.0) * cores  # cores' worth of work by other processes
    if busy < max(0.75, 0.4 * cores):
        return None
    return (f"note: other jobs keep about {busy:.1f} of this machine's {cores} cores busy: stages will take "
            f"longer than the estimates, which assume quiet cores")


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def describe(cfg: SpeedrunConfig, stages: list[str], configs: dict, done: dict) -> str:
    """The --dry_run plan: each stage and whether it runs, the pretraining plan (model, tokens, FLOPs,
    time and cost estimates), and the expected wall time of the tiny preset on 2 CPU cores."""
    import torch

    from chatforge.config import PRESET_HARDWARE
    from chatforge.hardware import device_name
    from chatforge.plan import derive_settings, describe_plan
    from chatforge.tokenizer import Tokenizer

    lines = [f"speedrun plan: preset {cfg.preset}, run '{configs[stages[0]].run}', {len(stages)} stage(s)"]
    for i, name in enumerate(stages, 1):
        state = ("complete, skipped" if done[name] else
                 "runs (keeps finished parts)" if name in ALWAYS_RUN and name not in (cfg.only, cfg.from_stage)
                 else "runs")
        table = STAGE_SECONDS.get(cfg.preset, {})
        est = f"  ~{fmt_s(table[name])} on 2 CPU cores" if name in table and not done[name] else ""
        lines.append(f"  {i}. {name:10s} {state}{est}")
    if "pretrain" in configs:
        pc = configs["pretrain"]
        vocab = configs.get("tokenizer", resolve_config(STAGE_CONFIGS["tokenizer"], stage="tokenizer",
                                                         preset=cfg.preset)).vocab_size
        with contextlib.suppress(ChatforgeError):  # the trained tokenizer's own size, once there is one
            vocab = Tokenizer.load(stage_dir(pc, "tokenizer")).vocab_size
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        world = PRESET_HARDWARE.get(cfg.preset, ("", 1))[1]  # the preset's GPUs (torchrun ranks)
        lines += ["", "pretraining:", describe_plan(derive_settings(pc, vocab, world), dev, device_name(dev))]
    if cfg.preset in STAGE_SECONDS:
        table = STAGE_SECONDS[cfg.preset]
        lines.append(f"\nexpected wall time on 2 CPU cores: about {fmt_s(sum(table.get(s, 0) for s in stages if not done[s]))}"
                     " (plus pip in a fresh clone)")
    return "\n".join(lines)


def next_steps(root: Path) -> str:
    """What to type next: chat with and serve the run's most trained checkpoint."""
    ck = latest_checkpoint(root)
    if ck is None:
        return f"speedrun: {root} has no checkpoint yet"
    base = ("" if ck.parent.name != "pretrain" else
            "\n  (a base model: it continues text rather than chatting; the sft stage makes a chat model)")
    return (f"\nthe result: {ck}{base}\n  chat with it:  chatforge chat {ck}\n"
            f"  serve it:      chatforge serve {ck}   (OpenAI-compatible API and web chat on http://127.0.0.1:8000)\n"
            f"  report card:   {root / 'report' / 'report.html'}")
