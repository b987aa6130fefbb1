"""`chatforge report [RUN]`: the run's report card, written and printed.

    chatforge report tiny                 # runs/tiny/report/report.md, report.html, *.png
    chatforge report runs/tiny --show no  # write only

The page (chatforge/report.py) is rebuilt from the run's artifacts every time, so it always shows the
latest evaluations; it reads and never changes the other stages' folders.
"""

from __future__ import annotations

import dataclasses

from chatforge.common import log0, stage_run
from chatforge.config import PRESET_HARDWARE
from chatforge.report import GpuSetup, find_run, write_report
# TODO(merge): the GPU tables belong in a library module; the report needs them for its cost estimates.
from chatforge.hardware import ASSUMED_MFU, gpu_peak_flops, gpu_price


def run(cfg) -> dict:
    root = find_run(cfg.run, cfg.runs_dir)
    cfg = dataclasses.replace(cfg, run=root.name, runs_dir=str(root.parent))
    setups = [GpuSetup(f"{n} x {gpu} (preset {preset})", n, gpu_peak_flops(gpu), gpu_price(gpu))
              for preset, (gpu, n) in PRESET_HARDWARE.items()]
    paths = write_report(root, root / "report", setups, ASSUMED_MFU)  # a run with nothing to report fails here
    with stage_run(cfg, "report") as srun:  # provenance (config, meta) and DONE beside the page
        srun.finish({k: str(v) for k, v in paths.items()})
    if cfg.show:
        print(paths["md"].read_text(encoding="utf-8"))
    log0(f"report: wrote {paths['md']} and {paths['html']} ({len(paths) - 2} plot(s))")
    return {k: str(v) for k, v in paths.items()}
