"""PNG plots of a stage's metrics.jsonl (matplotlib, Agg backend: no display needed).

metrics.jsonl holds one JSON object per line: per-step records (no "event" key: step, loss, lr,
tokens_per_s, ...) and event records ({"event": "eval", "step": ..., "val_bpb": ...}). A resumed run
appends records for steps it redoes; the latest record of a step wins.

    plot_losses(run / "metrics.jsonl", run / "loss.png", unigram=3.05)            # pretraining
    plot_metrics(run / "metrics.jsonl", run / "sft.png", ["loss", "eval/val_loss", "reward"])
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(metrics: str | os.PathLike) -> tuple[dict[int, dict], dict[str, dict[int, dict]]]:
    """(step records by step, event records by event name then step); unreadable lines (a line cut
    by a crash) are skipped; a later record of the same step replaces an earlier one."""
    steps: dict[int, dict] = {}
    events: dict[str, dict[int, dict]] = {}
    for line in Path(metrics).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or "step" not in r:
            continue
        if "event" in r:
            events.setdefault(str(r["event"]), {})[r["step"]] = r
        else:
            steps[r["step"]] = r
    return steps, events


def _series(steps, events, column: str) -> tuple[list, list]:
    """x, y of a column: "name" from the step records, "event/name" from that event's records."""
    event, _, key = column.rpartition("/")
    table = events.get(event, {}) if event else steps
    xs = sorted(s for s, r in table.items() if isinstance(r.get(key), (int, float)))
    return xs, [table[s][key] for s in xs]


def _save(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)  # a reader never sees half a PNG


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics: str | os.PathLike, png: str | os.PathLike, columns: list,
                 title: str | None = None) -> Path:
    """One panel per column against the step: "loss" reads the per-step records, "eval/val_bpb" the
    records of event "eval"; a list of columns shares one panel, with a legend (curves to compare, e.g.
    ["eval/rm_score", "eval/judge_score"]). Columns with no values are drawn empty (titled "no data").
    Returns png."""
    plt = _pyplot()
    steps, events = read_metrics(metrics)
    n = max(1, len(columns))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], columns):
        group = [panel] if isinstance(panel, str) else list(panel)
        drawn = 0
        for column in group:
            xs, ys = _series(steps, events, column)
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", lw=1.2, ms=3, label=column)
            drawn += bool(xs)
        ax.set_xlabel("step")
        ax.set_ylabel(group[0] if len(group) == 1 else "value")
        if len(group) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.set_title("no data")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, Path(png))
    return Path(png)


def plot_losses(metrics: str | os.PathLike, png: str | os.PathLike, unigram: float | None = None) -> Path:
    """Training loss (raw and smoothed) per step and validation bpb per evaluation, with the unigram
    baseline as a dashed line."""
    plt = _pyplot()
    steps, events = read_metrics(metrics)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    s, loss = _series(steps, events, "loss")
    a1.plot(s, loss, lw=0.6, alpha=0.5, label="loss")
    a1.plot(s, [steps[k].get("smooth_loss", steps[k]["loss"]) for k in s], lw=1.5, label="smoothed")
    a1.set_xlabel("step")
    a1.set_ylabel("train loss (nats/token)")
    a1.legend()
    a1.grid(alpha=0.3)
    v, bpb = _series(steps, events, "eval/val_bpb")
    a2.plot(v, bpb, "o-", label="model")
    if unigram:
        a2.axhline(unigram, color="gray", ls="--", label=f"unigram {unigram:.3f}")
    a2.set_xlabel("step")
    a2.set_ylabel("validation bits per byte")
    a2.legend()
    a2.grid(alpha=0.3)
    _save(fig, Path(png))
    return Path(png)
