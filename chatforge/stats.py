"""Small statistics shared by the measurements of several stages (RL's pass@1, RLHF's pairwise accuracy)."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate (stays inside [0, 1] and is sensible at 0/n,
    where the normal approximation collapses to a point). Wilson 1927; see Brown, Cai & DasGupta 2001.

    >>> [round(v, 3) for v in wilson_interval(9, 10)]
    [0.596, 0.982]
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def pooled(results: dict[str, dict], key: str) -> float:
    """The mean of `key` over several sources' results weighted by their counts `n` (the rate over all
    their items together).

    >>> pooled({"a": {"acc": 1.0, "n": 3}, "b": {"acc": 0.0, "n": 1}}, "acc")
    0.75
    """
    n = sum(r["n"] for r in results.values())
    return sum(r[key] * r["n"] for r in results.values()) / n if n else float("nan")
