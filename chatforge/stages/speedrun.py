"""`chatforge speedrun`: every pipeline stage in order on one preset, skipping complete stages.

Each stage gets the preset, the optional TOML file's [<stage>] section, and the shared settings given
here (run, runs_dir, data_dir, device, threads, seed, force), in that order of precedence. A stage
that is already complete (its DONE marker exists) returns at once, so a killed speedrun resumes
where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib
import time

from chatforge.common import ChatforgeError, log0
from chatforge.config import PIPELINE, STAGE_CONFIGS, CommonConfig, SpeedrunConfig, resolve_config


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
    return summary
