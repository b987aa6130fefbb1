"""Reading a data run back: the funnel table and `chatforge data inspect`'s report.

Both read only what the data stage wrote (stats.json, the shards, the tasks' dropped samples), so a
benchmark, a test or a notebook can use them on any finished run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

STATS = "stats.json"  # the data stage's funnel file, in its stage folder


def funnel_table(stats: dict) -> str:
    """The funnel as a markdown table: per step, documents in/out, removed, words removed, top reasons.

    >>> st = {"in": 3, "out": 2, "dropped": {"empty": 1}, "seconds": 0.5, "words_in": 0, "words_out": 0}
    >>> print(funnel_table({"steps": {"extract": st}}).splitlines()[-1])
    | extract | 3 | 2 | 1 | 0 | 0.5 | empty 1 |
    """
    rows = ["| step | docs in | docs out | removed | words removed | seconds | top reasons |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name, st in stats["steps"].items():
        if st["in"] == 0 and name not in ("read",):
            continue
        removed = st["in"] - st["out"]
        words = (st["words_in"] - st["words_out"]) if st["words_in"] else 0
        top = ", ".join(f"{r} {n:,}" for r, n in sorted(st["dropped"].items(), key=lambda x: -x[1])[:4])
        rows.append(f"| {name} | {st['in']:,} | {st['out']:,} | {removed:,} | {words:,} | {st['seconds']:.1f} | "
                    f"{top} |")
    return "\n".join(rows)


def inspect_report(stage_path: Path, k: int = 3, seed: int = 0, chars: int = 300) -> str:
    """The funnel and k random kept and k random dropped documents of the data stage folder `stage_path`
    (the one holding stats.json, shards/ and tasks/)."""
    from chatforge.data.pipeline import sample_rows

    d = Path(stage_path)
    stats = json.loads((d / STATS).read_text())
    lines = [f"data run {d}: {stats['docs_in']:,} documents in, {stats['docs_out']:,} kept "
             f"({100 * stats['docs_out'] / max(1, stats['docs_in']):.1f}%), {len(stats.get('shards', []))} shard(s), "
             f"{stats.get('docs_per_second', 0):.0f} docs/s", "", funnel_table(stats)]
    fe = stats.get("file_errors") or {}
    if fe:
        lines.append("\nfile errors: " + ", ".join(f"{k} {v}" for k, v in fe.items()))
    lines += [f"  {name}: {problem}" for name, problem in (stats.get("input_problems") or {}).items()]
    pii = stats.get("pii", {})
    lines.append(f"\nPII masked (e-mails / IP addresses / phone numbers): {pii.get('emails', 0)} / "
                 f"{pii.get('ips', 0)} / {pii.get('phones', 0)}")
    rng = random.Random(seed)

    def short(t: str | None) -> str:
        return " ".join((t or "").split())[:chars]

    lines.append(f"\n== {k} random kept documents ==")
    for row in sample_rows(sorted((d / "shards").glob("*.parquet")), k, seed):
        lines.append(f"- [{row['lang']} {row['lang_score']:.2f}] {row['url']}\n  {short(row['text'])}")
    dropped = []
    for f in sorted((d / "tasks").glob("*.dropped.jsonl")):
        dropped += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    lines.append(f"\n== {min(k, len(dropped))} random dropped documents ==")
    for x in rng.sample(dropped, min(k, len(dropped))):
        lines.append(f"- [{x['step']}: {x['reason']}] {x['url']}\n  {short(x['text']) or '(no text)'}")
    return "\n".join(lines)
