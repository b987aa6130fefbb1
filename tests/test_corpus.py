"""The corpus reader (chatforge.corpus): file formats, bad records, bad files, and one clear error per bad
input. (Document boundaries by hand and the reader shared with the search index: tests/test_search.py.)"""

from __future__ import annotations

import re

import pytest

from chatforge.common import ChatforgeError
from chatforge.corpus import CorpusStats, iter_documents


def test_missing_and_non_utf8_corpus(tmp_path):
    with pytest.raises(ChatforgeError, match="nope.txt' not found"):
        list(iter_documents([str(tmp_path / "nope.txt")]))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ChatforgeError, match=re.escape(str(bad)) + ".*not valid UTF-8"):
        list(iter_documents([str(bad)]))
    with pytest.raises(ChatforgeError, match="matches no file"):
        list(iter_documents([str(tmp_path / "*.parquet")]))


def test_json_list_corpus(tmp_path):
    f = tmp_path / "docs.json"
    f.write_text('\n  [{"text": "one"}, {"question": "q?", "answer": "a"}]')
    assert list(iter_documents([str(f)])) == ["one", "q?\na"]
    f.write_text('[{"text": "one"},')
    with pytest.raises(ChatforgeError, match="docs.json' is not valid JSON"):
        list(iter_documents([str(f)]))


def test_bad_jsonl_records_are_skipped_and_counted(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "good one"}\nnot json at all\n{"text": ""}\n{"text": "good two"}\n')
    stats = CorpusStats()
    assert list(iter_documents([str(f)], stats=stats)) == ["good one", "good two"]
    assert stats.bad_records == 2 and stats.documents == 2
