"""pyproject.toml says what the code needs: the Python floor covers the stdlib modules the code imports,
and the data extra pins trafilatura to the range FineWeb's reference pipeline uses."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# stdlib modules newer than 3.10, with the version that added them
NEW_STDLIB = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requires_python_covers_the_stdlib_modules_imported():
    floor = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", _project()["requires-python"]).groups())
    needed = {}
    for f in (ROOT / "chatforge").rglob("*.py"):
        for mod in re.findall(r"^\s*(?:import|from)\s+([\w.]+)", f.read_text(encoding="utf-8"), re.M):
            if mod in NEW_STDLIB:
                needed[f"{f.relative_to(ROOT)}: {mod}"] = NEW_STDLIB[mod]
    assert needed, "the scan found no tomllib import; update this test"
    assert {k: v for k, v in needed.items() if v > floor} == {}


def test_data_extra_pins_fineweb_trafilatura():
    from chatforge.data.extract import FINEWEB_TRAFILATURA, fineweb_trafilatura

    spec = next(d for d in _project()["optional-dependencies"]["data"] if d.startswith("trafilatura"))
    lo, hi = FINEWEB_TRAFILATURA
    assert spec == f"trafilatura>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
    assert fineweb_trafilatura("1.11.0") and fineweb_trafilatura("1.8.1")
    assert not fineweb_trafilatura("1.6.4") and not fineweb_trafilatura("2.3.1") and not fineweb_trafilatura("x")
