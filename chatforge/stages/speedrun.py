"""`chatforge speedrun`: every pipeline stage in order on one preset, skipping complete stages, then
the report card (printed by the report stage) and the commands to chat with and serve the result.

Each stage gets the preset, the optional TOML file's [<stage>] section, and the shared settings given
here (run, runs_dir, data_dir, device, threads, seed, force), in that order of precedence. A stage
that is already complete (its DONE marker exists) returns at once, so a killed speedrun resumes
where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path

from chatforge.common import ChatforgeError, log0
from chatforge.config import PIPELINE, STAGE_CONFIGS, CommonConfig, SpeedrunConfig, resolve_config
from chatforge.report import latest_checkpoint


def run(cfg: SpeedrunConfig) -> dict:
    stages = cfg.stages or PIPELINE
    unknown = [s for s in stages if s not in PIPELINE]
    if unknown:
        raise ChatforgeError(f"--stages: unknown stage(s) {', '.join(unknown)}; pipeline: {', '.join(PIPELINE)}")
    # Only the shared settings the user actually changed from their defaults are passed on, so a
    # preset's own `run` name is kept unless --run was given.
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig)
              if getattr(cfg, f.name) != f.default}
    summary = {}
    t0 = time.time()
    for name in [s for s in PIPELINE if s in stages]:
        stage_cfg = resolve_config(STAGE_CONFIGS[name], stage=name, preset=cfg.preset,
                                   config_file=cfg.config or None, overrides=common)
        log0(f"\n=== speedrun: {name} (run '{stage_cfg.run}', preset {cfg.preset}) ===")
        t = time.time()
        summary[name] = importlib.import_module(f"chatforge.stages.{name}").run(stage_cfg)
        log0(f"=== speedrun: {name} done in {time.time() - t:.1f}s ===")
    log0(f"\nspeedrun: {len(summary)} stage(s) complete in {time.time() - t0:.1f}s")
    if summary:
        log0(next_steps(Path(stage_cfg.runs_dir) / stage_cfg.run))
    return summary


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
