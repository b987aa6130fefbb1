"""The report card of a run: what the data, pretraining, SFT, RL and RLHF stages each did, side by side.

    paths = write_report("runs/tiny")          # runs/tiny/report/{report.md, report.html, *.png}

Everything comes from the run directory's artifacts; nothing is recomputed:

    header        run, date, git revision(s), library versions, hardware; per stage its wall time,
                  tokens and an estimated GPU cost on the GPU presets' hardware
    data funnel   data/stats.json: documents in and out of every filter step, top reasons
    tokenizer     tokenizer/report.json: bytes per token on held-out text, against GPT-2
    curves        <stage>/metrics.jsonl -> one PNG per training stage (pretraining loss and bits per
                  byte; SFT loss; RL reward; RLHF reward, KL and judge score)
    metrics       eval/<label>/eval.json of every checkpoint: the table of metrics by stage (base,
                  SFT, RL, RLHF), like nanochat's report card
    probes        the weak-spot probes, each with and without tools, by stage

A stage without artifacts reads "not run yet"; a stage that ran but was not evaluated says how to
evaluate it. The page is built once as a list of blocks and rendered twice: Markdown with padded
tables (readable in a terminal, `report.md`) and a self-contained HTML page whose images are the
PNG files beside it (`report.html`).
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from chatforge.common import ChatforgeError, atomic_write_text
from chatforge.evaluate import GROUPS, PROBES, TASKS, read_eval
from chatforge.tasks.mc import CORE_TASKS

# Checkpoint stages in pipeline order: (report label, stage folder).
# RLHF's checkpoint is its DPO policy (runs/<run>/rlhf/dpo/checkpoint; rlhf/rm holds the reward model).
CHECKPOINT_STAGES: list[tuple[str, str]] = [("base", "pretrain"), ("sft", "sft"), ("rl", "rl"), ("rlhf", "rlhf/dpo")]
LABEL_TITLES = {"base": "BASE", "sft": "SFT", "rl": "RL", "rlhf": "RLHF"}
PIPELINE_STAGES = ["data", "tokenizer", "pretrain", "index", "sft", "rl", "rlhf", "eval"]
# What each training stage's curves plot: metrics.jsonl keys, first found wins per panel.
CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "pretrain": [("train loss (nats/token)", ["smooth_loss", "loss"]), ("validation bits per byte", ["val_bpb"])],
    "sft": [("train loss", ["smooth_loss", "loss"]), ("validation loss", ["val_loss", "val_bpb"])],
    "rl": [("reward", ["reward", "mean_reward"]), ("pass@1", ["pass@1", "accuracy"]), ("KL", ["kl"])],
    "rlhf": [("DPO loss", ["smooth_loss", "loss"]), ("held-out implicit reward margin", ["polite/margin", "margin"])],
    # `rlhf grpo` (not in the speedrun): the reward-hacking monitor's four curves
    "rlhf_grpo": [("reward (training RM)", ["reward"]), ("KL to the start", ["kl"]),
                  ("held-out RM score", ["rm_score"]), ("judge score (held-out RM)", ["judge_score"])],
    # `rlhf ppo` (not in the speedrun): the same four curves
    "rlhf_ppo": [("reward (training RM)", ["reward"]), ("KL to the start", ["kl"]),
                 ("held-out RM score", ["rm_score"]), ("judge score (held-out RM)", ["judge_score"])],
}
# Where a stage's curves are read from, when not <stage>/metrics.jsonl: (stage folder, file).
CURVE_FILES: dict[str, tuple[str, str]] = {"rlhf": ("rlhf", "dpo/metrics.jsonl"), "rlhf_grpo": ("rlhf", "grpo/metrics.jsonl"),
                                            "rlhf_ppo": ("rlhf", "ppo/metrics.jsonl")}


@dataclass
class GpuSetup:
    """Hardware a cost estimate is made for (the GPU presets' machines)."""

    label: str  # e.g. "1 x H100 (preset gpu)"
    gpus: int
    peak_flops: float  # bf16 dense, per GPU
    price_per_hour: float  # US$ per GPU-hour


# ----------------------------------------------------------------------------------------------
# Blocks and their two renderings


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # one of l / r per column; default: first left, the rest right


@dataclass
class Image:
    path: str  # relative to the report folder
    alt: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Table | Image | Code


def _aligns(t: Table) -> str:
    return t.align or "l" + "r" * (len(t.header) - 1)


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown whose tables are padded to line up in a monospace terminal."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Code):
            out.append("```\n" + b.text.rstrip("\n") + "\n```")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
        elif isinstance(b, Table):
            al = _aligns(b)
            cells = [b.header] + b.rows
            widths = [max(len(r[i]) if i < len(r) else 0 for r in cells) for i in range(len(b.header))]
            widths = [max(w, 3) for w in widths]

            def line(row):
                parts = [(c.ljust(w) if a == "l" else c.rjust(w)) for c, w, a in zip(row, widths, al)]
                return "| " + " | ".join(parts) + " |"

            sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                                 for w, a in zip(widths, al)) + "|"
            out.append("\n".join([line(b.header), sep] + [line(r + [""] * (len(b.header) - len(r))) for r in b.rows]))
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    """Escape, then `code` and **bold** (the only inline markup the report writes)."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;
border:1px solid #eee}code,pre{background:#f6f6f6;font-family:ui-monospace,Menlo,monospace}pre{padding:.6em;
overflow-x:auto}"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained page (inline CSS, no scripts, no remote assets; images are local files)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Code):
            body.append(f"<pre>{html.escape(b.text)}</pre>")
        elif isinstance(b, Image):
            body.append(f'<p><img src="{html.escape(b.path, quote=True)}" alt="{html.escape(b.alt, quote=True)}"></p>')
        elif isinstance(b, Table):
            al = _aligns(b)
            head = "".join(f'<th class="{a}">{_inline_html(h)}</th>' for h, a in zip(b.header, al))
            rows = "".join("<tr>" + "".join(f'<td class="{a}">{_inline_html(c)}</td>' for c, a in zip(r, al)) + "</tr>"
                           for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------
# Reading the run


def _read_json(path: Path) -> Any:
    """JSON content, or None when the file is absent or unreadable (the report never dies on a stage's
    bookkeeping; eval files, which carry the numbers, are checked strictly by read_eval)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a cut-off last line (a crash mid-write) is skipped."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


@dataclass
class RunInfo:
    root: Path
    stages: dict[str, dict] = field(default_factory=dict)  # name -> {done, meta, dir}
    evals: dict[str, dict] = field(default_factory=dict)  # label -> eval.json content
    checkpoints: dict[str, Path] = field(default_factory=dict)  # label -> checkpoint folder


def find_run(run: str, runs_dir: str | os.PathLike = "runs") -> Path:
    """The run folder: a name under runs_dir or a path; a clear error listing the runs there."""
    p = Path(run).expanduser()
    if p.is_dir() and any((p / s).is_dir() for s in PIPELINE_STAGES):
        return p
    root = Path(runs_dir) / run
    if root.is_dir():
        return root
    runs = sorted(d.name for d in Path(runs_dir).iterdir() if d.is_dir()) if Path(runs_dir).is_dir() else []
    have = f"runs in {runs_dir}: {', '.join(runs)}" if runs else f"{runs_dir} holds no runs"
    raise ChatforgeError(f"run {run!r} not found ({root} is not a folder; {have}); run `chatforge speedrun "
                         f"--preset tiny` or name an existing run")


def read_run(root: Path) -> RunInfo:
    info = RunInfo(root)
    for name in PIPELINE_STAGES:
        d = root / name
        if d.is_dir() and name != "eval":
            info.stages[name] = {"dir": d, "done": _read_json(d / "DONE"), "meta": _read_json(d / "meta.json")}
    # eval keeps one stage folder per checkpoint (eval/base, eval/sft, ...): shown as one stage.
    parts = [root / "eval" / label for label, _ in CHECKPOINT_STAGES if (root / "eval" / label).is_dir()]
    if parts:
        dones = [_read_json(p / "DONE") for p in parts]
        metas = [m for m in (_read_json(p / "meta.json") for p in parts) if m]
        done = ({"seconds": sum(d.get("seconds", 0) for d in dones), "checkpoints": len(parts)}
                if all(dones) else None)
        info.stages["eval"] = {"dir": root / "eval", "done": done,
                               "meta": max(metas, key=lambda m: m.get("started", "")) if metas else None}
    for label, stage in CHECKPOINT_STAGES:
        ck = root / stage / "checkpoint"
        if (ck / "config.json").exists():
            info.checkpoints[label] = ck
        ev = root / "eval" / label / "eval.json"
        if ev.exists():
            info.evals[label] = read_eval(ev)  # strict: a broken eval file is an error naming it
    return info


# ----------------------------------------------------------------------------------------------
# Sections


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return "<1 s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_int(n) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) and not isinstance(n, bool) else "-"


def _fmt_money(x: float) -> str:
    return f"${x:,.0f}" if x >= 10 else f"${x:.2f}" if x >= 0.01 else "<$0.01"


def stage_flops(name: str, done: dict | None) -> float | None:
    """Training FLOPs a stage reports (pretrain: FLOPs/token x tokens; others may write `flops`)."""
    if not done:
        return None
    if done.get("flops"):
        return float(done["flops"])
    if done.get("flops_per_token") and done.get("tokens"):
        return float(done["flops_per_token"]) * float(done["tokens"])
    return None


def header_section(info: RunInfo, gpu_setups: Sequence[GpuSetup], mfu: float, now: str) -> list[Block]:
    metas = {n: s["meta"] for n, s in info.stages.items() if s.get("meta")}
    revs = sorted({m.get("git_revision", "unknown") for m in metas.values()})
    latest = max(metas.values(), key=lambda m: m.get("started", ""), default={})
    versions = latest.get("versions", {})
    hosts = sorted({m.get("host", "?") for m in metas.values()})
    pre = (info.stages.get("pretrain") or {}).get("done") or {}
    device = str(pre.get("device", "an unknown device"))
    if pre.get("world_size", 1) > 1:
        device += f" x {pre['world_size']}"
    mem = f", peak memory {pre['max_memory_gb']:.1f} GB" if pre.get("max_memory_gb") else ""
    blocks: list[Block] = [Heading(f"chatforge report card: run `{info.root.name}`", 1)]
    lines = [f"Made {now} from `{info.root}`.",
             f"Git revision{'s' if len(revs) > 1 else ''}: {', '.join(f'`{r}`' for r in revs) or 'unknown'}.",
             "Versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown") + ".",
             f"Hardware: host {', '.join(hosts) or 'unknown'}; pretraining on {device}{mem}. "
             f"This report: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs."]
    blocks += [Para(" ".join(lines))]
    header = ["stage", "status", "wall time", "work"] + [f"est. {g.label}" for g in gpu_setups]
    rows = []
    total = 0.0
    for name in PIPELINE_STAGES:
        st = info.stages.get(name)
        if st is None:
            rows.append([name, "not run yet", "-", "-"] + ["-"] * len(gpu_setups))
            continue
        done = st["done"]
        status = "done" if done is not None else "incomplete"
        secs = done.get("seconds") if done else None
        total += secs or 0.0
        work = _stage_work(name, done)
        flops = stage_flops(name, done)
        est = []
        for g in gpu_setups:
            if flops is None:
                est.append("-")
                continue
            hours = flops / (g.gpus * g.peak_flops * mfu) / 3600
            est.append(f"{_fmt_seconds(hours * 3600)}, {_fmt_money(hours * g.gpus * g.price_per_hour)}")
        rows.append([name, status, _fmt_seconds(secs), work] + est)
    blocks.append(Table(header, rows, "ll" + "r" + "l" + "r" * len(gpu_setups)))
    blocks.append(Para(f"Wall time of the complete stages: {_fmt_seconds(total)}. GPU estimates: the stage's "
                       f"training FLOPs at {mfu:.0%} MFU (bf16) on the GPU presets' machines, at on-demand cloud "
                       f"prices; `-` where a stage reports no FLOPs."))
    return blocks


def _stage_work(name: str, done: dict | None) -> str:
    if not done:
        return "-"
    if name == "data" and "docs_in" in done:
        return f"{_fmt_int(done['docs_in'])} -> {_fmt_int(done.get('docs_out'))} docs"
    if name == "tokenizer" and "chars" in done:
        return f"{_fmt_int(done['chars'])} chars, vocab {_fmt_int(done.get('vocab_size'))}"
    if name == "eval" and "checkpoints" in done:
        return f"{done['checkpoints']} checkpoint(s)"
    if name == "rl" and "steps" in done:
        return f"{_fmt_int(done['steps'])} steps on {done.get('task')}"
    if name == "rlhf" and isinstance(done.get("rm"), dict):
        return f"RM {_fmt_int(done['rm'].get('steps'))} + DPO {_fmt_int((done.get('dpo') or {}).get('steps'))} steps"
    if name == "index" and "passages" in done:
        return f"{_fmt_int(done['passages'])} passages"
    if "tokens" in done:
        params = f"{done['num_params'] / 1e6:.1f}M params, " if isinstance(done.get("num_params"), (int, float)) else ""
        steps = f", {_fmt_int(done['step'])} steps" if "step" in done else ""
        return f"{params}{_fmt_int(done['tokens'])} tokens{steps}"
    return "-"


def data_section(info: RunInfo) -> list[Block]:
    blocks: list[Block] = [Heading("Data funnel")]
    st = info.stages.get("data")
    stats = _read_json(st["dir"] / "stats.json") if st else None
    if not stats or not isinstance(stats.get("steps"), dict):
        return blocks + [Para("Data stage: not run yet (`chatforge data process`).")]
    rows = []
    for step, s in stats["steps"].items():
        dropped = s.get("dropped") or {}
        top = ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])[:3])
        removed = (s.get("in") or 0) - (s.get("out") or 0)
        rows.append([step, _fmt_int(s.get("in")), _fmt_int(s.get("out")), _fmt_int(removed), top])
    blocks.append(Table(["step", "docs in", "docs out", "removed", "top reasons"], rows, "lrrrl"))
    kept = stats.get("docs_out")
    if stats.get("docs_in"):
        pii = ", ".join(f"{k} {v:,}" for k, v in (stats.get("pii") or {}).items()) or "none"
        blocks.append(Para(f"{_fmt_int(stats['docs_in'])} documents in, {_fmt_int(kept)} kept "
                           f"({100 * (kept or 0) / stats['docs_in']:.1f}%) from {_fmt_int(stats.get('files'))} "
                           f"file(s); PII masked: {pii}."))
    return blocks


def tokenizer_section(info: RunInfo) -> list[Block]:
    blocks: list[Block] = [Heading("Tokenizer compression")]
    st = info.stages.get("tokenizer")
    rep = _read_json(st["dir"] / "report.json") if st else None
    if not rep or not isinstance(rep.get("held_out"), dict):
        return blocks + [Para("Tokenizer stage: not run yet (`chatforge tokenizer`).")]
    refs = sorted({k for v in rep["held_out"].values() for k in v if isinstance(v.get(k), dict)} - {"chatforge"})
    rows = []
    for kind, v in rep["held_out"].items():
        ours = (v.get("chatforge") or {}).get("bytes_per_token")
        row = [kind, v.get("file", ""), _fmt_int(v.get("bytes")), f"{ours:.2f}" if ours else "-"]
        for r in refs:
            bpt = (v.get(r) or {}).get("bytes_per_token")
            row.append(f"{bpt:.2f}" if bpt else "-")
        rows.append(row)
    blocks.append(Table(["held-out text", "file", "bytes", f"chatforge (vocab {_fmt_int(rep.get('vocab_size'))})"]
                        + [f"{r}" for r in refs], rows, "llrr" + "r" * len(refs)))
    blocks.append(Para("Bytes per token on text the tokenizer did not train on (higher is better)."))
    return blocks


def plot_curves(records: list[dict], panels: list[tuple[str, list[str]]], png: Path, title: str,
                baselines: dict[str, tuple[str, float]] | None = None) -> bool:
    """One panel per metric found in the records (x = step); False when there is nothing to plot.
    `baselines` draws a labelled horizontal line on the panel of a key, e.g. the unigram bits/byte."""
    found = []
    for label, keys in panels:
        for key in keys:
            pts = {}
            for r in records:
                v = r.get(key)
                if isinstance(r.get("step"), (int, float)) and isinstance(v, (int, float)) and math.isfinite(v):
                    pts[r["step"]] = v  # a resumed run's re-done step: the later record
            if len(pts) >= 1:
                found.append((label, key, sorted(pts.items())))
                break
    if not found:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(4.6 * len(found), 3.4), squeeze=False)
    for ax, (label, key, pts) in zip(axes[0], found):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1.3, label=key)
        if baselines and key in baselines:
            name, value = baselines[key]
            ax.axhline(value, color="gray", ls="--", lw=1, label=f"{name} {value:.3f}")
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return True


def curves_section(info: RunInfo, out_dir: Path) -> tuple[list[Block], list[Path]]:
    blocks: list[Block] = [Heading("Training curves")]
    written = []
    titles = {"pretrain": "Pretraining", "sft": "SFT", "rl": "RL", "rlhf": "RLHF (DPO)",
              "rlhf_grpo": "RLHF (GRPO against the reward model, judged by a second one)",
              "rlhf_ppo": "RLHF (PPO against the reward model, judged by a second one)"}
    for stage, panels in CURVES.items():
        folder, file = CURVE_FILES.get(stage, (stage, "metrics.jsonl"))
        st = info.stages.get(folder)
        if stage in ("rlhf_grpo", "rlhf_ppo") and not (st and (st["dir"] / file).exists()):
            continue  # an optional action: no "not run yet" line for it
        records = read_metrics(st["dir"] / file) if st else []
        png = out_dir / f"{stage}.png"
        unigram = next((r.get("unigram_bpb") for r in records if r.get("event") == "baseline"), None)
        lines = {"val_bpb": ("unigram", unigram)} if isinstance(unigram, (int, float)) else None
        if records and plot_curves(records, panels, png, titles[stage], lines):
            blocks += [Para(f"**{titles[stage]}**"), Image(png.name, f"{titles[stage]} curves")]
            written.append(png)
        else:
            blocks.append(Para(f"**{titles[stage]}**: not run yet."))
    return blocks, written


def _cell(res: dict | None, key: str = "accuracy", digits: int = 3) -> str:
    if res is None:
        return "-"
    status = res.get("status")
    if status != "ok":
        return {"missing": "missing", "unavailable": "n/a", "not_implemented": "todo"}.get(status, str(status))
    v = res.get(key)
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _knowledge_cell(res: dict | None, refused: bool) -> str:
    """Accuracy, then the accuracy on people SFT never saw and (`refused`) the refusal rate where the
    result has them: "0.400 (unseen 0.33) (refused 0.10)"."""
    cell = _cell(res)
    if res is None or res.get("status") != "ok":
        return cell
    unseen = (res.get("groups") or {}).get("heldout")
    if unseen:
        cell += f" (unseen {unseen['accuracy']:.2f})"
    if refused and isinstance(res.get("refusal_rate"), (int, float)):
        cell += f" (refused {res['refusal_rate']:.2f})"
    return cell


def metrics_section(info: RunInfo) -> list[Block]:
    labels = [lab for lab, _ in CHECKPOINT_STAGES]
    blocks: list[Block] = [Heading("Metrics by stage")]
    cols = []
    for lab in labels:
        ev = info.evals.get(lab)
        title = LABEL_TITLES[lab]
        if ev is not None and not ev.get("complete"):
            title += " (partial)"
        cols.append(title)
    rows: list[list[str]] = []

    def row(name: str, f) -> None:
        rows.append([name] + [f(info.evals[lab]) if lab in info.evals else "-" for lab in labels])

    row("val bits/byte", lambda ev: _cell(ev["tasks"].get("bpb"), "bpb", 4))
    row("unigram bits/byte (same text)", lambda ev: _cell(ev["tasks"].get("bpb"), "unigram_bpb", 4))

    def core(ev):
        c = ev.get("core")
        if not c:
            return "-"
        return f"{c['score']:.4f}" + ("" if c.get("complete") else f" ({len(c['tasks'])}/{len(CORE_TASKS)})")

    row("CORE (centred, mean)", core)
    for name in GROUPS["core"]:
        row(f"{TASKS[name].title} (acc)", lambda ev, n=name: _cell(ev["tasks"].get(n)))
    for name in GROUPS["chat"]:
        row(TASKS[name].title, lambda ev, n=name: _cell(ev["tasks"].get(n)))
    blocks.append(Table(["metric"] + cols, rows))
    notes = []
    for lab, stage in CHECKPOINT_STAGES:
        if lab in info.evals:
            ev = info.evals[lab]
            s = ev.get("settings", {})
            if not ev.get("complete"):
                notes.append(f"{LABEL_TITLES[lab]}: partial eval file (interrupted); rerun `chatforge eval --run "
                             f"{info.root.name} {stage}` to finish it.")
            elif s.get("limit"):
                notes.append(f"{LABEL_TITLES[lab]}: {s['limit']} examples per task (a seeded subset).")
        elif lab in info.checkpoints:
            notes.append(f"{LABEL_TITLES[lab]}: checkpoint present, not evaluated yet (`chatforge eval --run "
                         f"{info.root.name} {stage}`).")
        else:
            notes.append(f"{LABEL_TITLES[lab]}: not run yet.")
    missing = sorted({n for ev in info.evals.values() for n, r in ev["tasks"].items() if r.get("status") == "missing"})
    if missing:
        reasons = {n: r["reason"] for ev in info.evals.values() for n, r in ev["tasks"].items() if n in missing}
        notes.append("Missing data: " + "; ".join(f"{n}: {reasons[n]}" for n in missing))
    blocks.append(Para("Accuracies are fractions (CORE: centred accuracy, 0 = chance, 1 = perfect). Chat tasks run "
                       "only on checkpoints that learned the chat protocol. " + " ".join(notes)))
    return blocks


def _pct(r: dict | None, key: str, ci: bool = True) -> str:
    """"84.4% [73.6, 91.3] of 64" from a result with key, key_low, key_high and n; "-" when absent."""
    if not isinstance(r, dict) or not isinstance(r.get(key), (int, float)):
        return "-"
    text = f"{r[key]:.1%}"
    if ci and isinstance(r.get(f"{key}_low"), (int, float)):
        text += f" [{r[f'{key}_low']:.1%}, {r[f'{key}_high']:.1%}]"
    return text + (f" of {r['n']}" if "n" in r else "")


def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def stage_results_section(info: RunInfo) -> list[Block]:
    """What each training stage measured on its own held-out items (its summary.json): the before /
    after the stage was built to move, which the shared suite above does not see (the RL task, the
    reward model's accuracy, DPO's preferred-reply rate)."""
    rows: list[list[str]] = []

    def summary(path: str) -> dict | None:
        return _read_json(info.root / path) if (info.root / path).exists() else None

    sft = summary("sft/summary.json")
    if sft:
        for what, keys in (("held-out replies well-formed (chat's sampling)",
                            ("well_formed", "well_formed_rate")),
                           ("held-out replies well-formed (greedy)", ("well_formed_greedy", "well_formed_rate")),
                           ("identity: names itself and its maker", ("identity", "name_and_maker_rate")),
                           ("letter counting with python: right", ("letter_count", "correct_rate")),
                           ("arithmetic with python: right", ("arithmetic", "correct_rate")),
                           ("probe: known people answered right", ("probe", "known_correct_rate")),
                           ("probe: known people never in SFT's probing data, right", ("probe", "known_heldout_correct_rate")),
                           ("probe: withheld people refused", ("probe", "unknown_refusal_rate"))):
            before, after = _get(sft, "before", *keys), _get(sft, "after", *keys)
            if after is not None:
                rows.append(["SFT", what, "-" if before is None else f"{before:.1%}", f"{after:.1%}"])
        if isinstance(_get(sft, "after", "bpb"), (int, float)):
            rows.append(["SFT", "pretraining text bits/byte", f"{sft['before']['bpb']:.4f}", f"{sft['after']['bpb']:.4f}"])
    rl = summary("rl/summary.json")
    if rl and "after" in rl:
        rows.append(["RL", f"{rl.get('task')}: held-out pass@1 (greedy)", _pct(rl.get("before"), "pass@1"),
                     _pct(rl["after"], "pass@1")])
        if "pass@k" in rl["after"]:
            rows.append(["RL", f"{rl.get('task')}: held-out pass@{rl['after'].get('k')}",
                         _pct(rl.get("before"), "pass@k", False), _pct(rl["after"], "pass@k", False)])
        if "after_gsm8k" in rl:
            rows.append(["RL", "GSM8K pass@1 (greedy)", _pct(rl.get("before_gsm8k"), "pass@1"),
                         _pct(rl["after_gsm8k"], "pass@1")])
    rm = summary("rlhf/rm/summary.json")
    for src, r in ((rm or {}).get("accuracy") or {}).items():
        chance = "above chance" if r.get("accuracy_low", 0) > 0.5 else "not above chance"
        rows.append(["RLHF", f"reward model, held-out pairs: {src} ({chance})", "-", _pct(r, "accuracy")])
    dpo = summary("rlhf/dpo/summary.json")
    for src, r in ((dpo or {}).get("after") or {}).items():
        b = _get(dpo, "before", src) or {}
        rows.append(["RLHF", f"DPO, held-out {src}: preferred by implicit reward", _pct(b, "implicit_accuracy"),
                     _pct(r, "implicit_accuracy")])
        if isinstance(r.get("margin"), (int, float)):
            rows.append(["RLHF", f"DPO, held-out {src}: implicit reward margin", f"{b.get('margin', 0):.3f}",
                         f"{r['margin']:.3f}"])
    if not rows:
        return []
    return [Heading("What each training stage measured"), Table(["stage", "measurement", "before", "after"], rows, "llrr"),
            Para("Each stage's own before / after on items it never trained on (95% Wilson intervals in brackets), "
                 "from its summary.json. A reward model or DPO result whose interval includes 50% is chance.")]


def probes_section(info: RunInfo) -> list[Block]:
    labels = [lab for lab, _ in CHECKPOINT_STAGES]
    blocks: list[Block] = [Heading("Weak-spot probes")]
    rows = []
    for name, title, _ in PROBES:
        cells = []
        for lab in labels:
            ev = info.evals.get(lab)
            if ev is None:
                cells.append("-")
                continue
            a, b = ev["tasks"].get(f"probe_{name}"), ev["tasks"].get(f"probe_{name}_tools")
            cells.append(f"{_cell(a)} / {_cell(b)}" if (a or b) else "-")
        rows.append([title] + cells)
    for n in ("probe_identity", "probe_fictional", "probe_fictional_known", "probe_known_facts"):
        # withheld people: the accuracy is the refusal rate already
        rows.append([TASKS[n].title] + [_knowledge_cell(info.evals[lab]["tasks"].get(n), n != "probe_fictional")
                                         if lab in info.evals else "-" for lab in labels])
    blocks.append(Table(["probe (no tools / tools)"] + [LABEL_TITLES[lab] for lab in labels], rows))
    blocks.append(Para("Each weak-spot cell: accuracy without tools / with the python tool. Identity: share of replies "
                       "naming the assistant (and its maker when asked). Withheld fictional people: share refused; "
                       "`unseen` = on people SFT never saw either. People in pretraining and well-known facts: share "
                       "answered right, `refused` = share declined. Probes run on chat checkpoints; `-` = no chat "
                       "checkpoint evaluated for that stage."))
    return blocks


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The run's most trained checkpoint (rlhf, else rl, else sft, else pretrain), or None."""
    for _, stage in reversed(CHECKPOINT_STAGES):
        ck = Path(root) / stage / "checkpoint"
        if (ck / "config.json").exists():
            return ck
    return None


def build_report(root: Path, out_dir: Path, gpu_setups: Sequence[GpuSetup] = (), mfu: float = 0.4,
                 now: str | None = None) -> tuple[list[Block], list[Path]]:
    info = read_run(root)
    if not info.stages:
        raise ChatforgeError(f"{root} holds no stage folders ({', '.join(PIPELINE_STAGES)}); nothing to report")
    now = now or time.strftime("%Y-%m-%d %H:%M:%S %Z")
    blocks = header_section(info, gpu_setups, mfu, now)
    blocks += data_section(info)
    blocks += tokenizer_section(info)
    curves, pngs = curves_section(info, out_dir)
    blocks += curves
    blocks += stage_results_section(info)
    blocks += metrics_section(info)
    blocks += probes_section(info)
    return blocks, pngs


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 gpu_setups: Sequence[GpuSetup] = (), mfu: float = 0.4) -> dict[str, Path]:
    """Write report.md, report.html and the PNG plots; returns their paths."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    blocks, pngs = build_report(root, out, gpu_setups, mfu)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, render_markdown(blocks))
    atomic_write_text(page, render_html(blocks, f"chatforge report: {root.name}"))
    return {"md": md, "html": page, **{p.stem: p for p in pngs}}
