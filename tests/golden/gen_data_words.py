"""Regenerate the golden values of tests/test_data_words.py from the references themselves, so they are
not numbers to take on trust:

- SPACY_WORDS: spaCy's English tokens (datatrove's `split_into_words`, which `spacy.blank("en")` backs) of
  the first six python-docs pages, as (count, digest);
- DATATROVE_DROPS: the first rule of datatrove's Gopher repetition -> Gopher quality -> C4 (no terminal-
  punctuation rule) -> FineWeb chain that drops each text of c4_demo.jsonl + wiki_demo.txt.

It needs datatrove and spaCy, which chatforge does not depend on: run it in the benchmark venv (GUIDE §6),
from the repository root:

    CHATFORGE_DATA_DIR=../shared/data /work/venv-bench/bin/python tests/golden/gen_data_words.py          # print
    CHATFORGE_DATA_DIR=../shared/data /work/venv-bench/bin/python tests/golden/gen_data_words.py --check  # compare

`--check` exits 1 and lists every difference from the committed values; bench/bench_data.py runs the same
check (`check_golden`) whenever it runs datatrove.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def data_root() -> Path:
    return Path(os.environ.get("CHATFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))


def spacy_words(root: Path) -> dict[str, tuple[int, str]]:
    from datatrove.utils.text import split_into_words

    from tests.test_data_words import spacy_pages, words_digest

    out = {}
    for url, text in spacy_pages(root):
        words = split_into_words(text)
        out[url] = (len(words), words_digest(words))
    return out


def datatrove_drops(root: Path) -> dict[str, list[int]]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    from chatforge.data.filters import reason_from_datatrove
    from tests.test_data_words import shared_texts

    chain = [("gopher_rep", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
             ("c4", C4QualityFilter(filter_no_terminal_punct=False)), ("fineweb", FineWebQualityFilter())]
    drops: dict[str, list[int]] = {}
    for i, text in enumerate(shared_texts(root)):
        doc = Document(text=text, id=str(i))
        for name, f in chain:
            res = f.filter(doc)
            if res is not True:
                drops.setdefault(f"{name}:{reason_from_datatrove(res[1])}", []).append(i)
                break
    return dict(sorted(drops.items()))


def versions() -> str:
    return ", ".join(f"{p} {metadata.version(p)}" for p in ("datatrove", "spacy"))


def check_golden(root: Path) -> list[str]:
    """The differences between the regenerated values and the committed ones ([] when they agree)."""
    from tests.test_data_words import DATATROVE_DROPS, SPACY_WORDS

    diffs = []
    for name, got, want in (("SPACY_WORDS", spacy_words(root), SPACY_WORDS),
                            ("DATATROVE_DROPS", datatrove_drops(root), DATATROVE_DROPS)):
        for k in sorted(set(got) | set(want)):
            if got.get(k) != want.get(k):
                diffs.append(f"{name}[{k!r}]: regenerated {got.get(k)}, committed {want.get(k)}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with tests/test_data_words.py; exit 1 on a difference")
    args = ap.parse_args()
    root = data_root()
    if args.check:
        diffs = check_golden(root)
        print(f"golden values of tests/test_data_words.py vs {versions()}: "
              + ("identical" if not diffs else f"{len(diffs)} difference(s)"))
        for d in diffs:
            print("  " + d)
        return 1 if diffs else 0
    print(f"# regenerated with {versions()}")
    print("SPACY_WORDS = {")
    for url, v in spacy_words(root).items():
        print(f"    {url!r}: {v},")
    print("}\nDATATROVE_DROPS = {")
    for k, v in datatrove_drops(root).items():
        print(f"    {k!r}: {v},")
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
