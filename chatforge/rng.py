"""Random-number-generator state as JSON-friendly data, so a resumed run draws the same numbers as
an uninterrupted one (torch CPU and CUDA generators, numpy's global state, Python's `random`).

    state = rng_state(device)          # into a checkpoint's state.json (tensors are encoded there)
    set_rng_state(state, device)       # after loading it back
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy's global state and Python's `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device) -> dict:
    """Every generator's state: {"torch": uint8 tensor, "numpy": list, "python": list[, "cuda": tensor]}."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state_to_json(np.random.get_state()),
             "python": _to_lists(random.getstate())}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    """Restore what `rng_state` returned (after a JSON round trip: tuples come back as lists)."""
    torch.set_rng_state(torch.as_tensor(state["torch"]).to(torch.uint8))
    np.random.set_state(_np_state_from_json(state["numpy"]))
    random.setstate(_to_tuples(state["python"]))
    if torch.device(device).type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).to(torch.uint8), device)


def _np_state_to_json(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_state_from_json(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
