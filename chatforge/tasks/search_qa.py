"""Search conversations: questions whose answer is in the search index, answered by a search call and a
reply that quotes what the search returned.

For a passage of a built index (chatforge/tools/search.py), pick an informative sentence, take its
salient words as the query, run the *real* search tool on it (same backend, k and token budget as the
engine will use, so the tool output in training is what the model will see at run time), and keep the
example only when a result from the passage's own document came back; the reply then quotes that
result's snippet, which is inside the tool output: the model learns to ground its answer in what the
tool said, never in a passage it did not see. A teacher (chatforge.tasks.teacher) can write the question
instead of the templates.

Held out: a passage belongs to a split by a hash of its document's URL, so 'val' questions come from
documents whose passages never appeared in training conversations.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from chatforge.tasks.conversations import split_of

_STOP = set("""a an the and or but if then than that this these those there their they them he she it its his her
we you your our i me my of to in on at by for from with as is are was were be been being have has had do does
did not no so such can could would should will may might must also which who whom whose what when where why how
all any each few more most other some into over under after before about above below between during through
again further once here only own same too very just one two three first new many much""".split())
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_TEMPLATES = ["What does the index say about {p}?", "Search for {p}.", "Can you look up {p} for me?",
              "Find information about {p}.", "What can you find on {p}?", "Look up {p} and tell me what it says."]


def salient_words(sentence: str, n: int = 4) -> list[str]:
    """Up to n content words of a sentence, in order: capitalised words and long words first.

    >>> salient_words("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.")
    ['Eiffel', 'Tower', 'World', 'Paris']
    """
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9-]+", sentence) if w.lower() not in _STOP]
    ranked = sorted(range(len(words)), key=lambda i: (not words[i][0].isupper(), -len(words[i]), i))
    keep = sorted(ranked[:n])
    return [words[i] for i in keep]


def _good_sentence(s: str) -> bool:
    words = s.split()
    letters = sum(c.isalpha() for c in s)
    return 8 <= len(words) <= 40 and letters / max(1, len(s)) > 0.7 and s[:1].isupper()


def search_conversations(index_path: str | Path, n: int = 200, split: str = "train", seed: int = 0,
                         val_fraction: float = 0.2, k: int = 3, token_budget: int = 256, count_tokens=None,
                         teacher=None, stats: Counter | None = None) -> Iterator[list[dict]]:
    """Up to n conversations: user question -> search call -> the tool's real output -> a reply quoting
    the snippet of the passage's document. Passages are visited in a seeded random order; one that gives
    no usable sentence, or whose document the search does not return, is counted in stats and skipped.
    With a teacher, the teacher writes the question from the sentence (a garbled reply is counted)."""
    from chatforge.tools.search import SqliteSearch, search_tool

    stats = stats if stats is not None else Counter()
    backend = SqliteSearch(index_path)
    tool = search_tool(backend, k=k, token_budget=token_budget, count_tokens=count_tokens)
    rowids = [r for (r,) in backend.db.execute("SELECT rowid FROM passages")]
    rng = random.Random(f"search|{split}|{seed}")
    rng.shuffle(rowids)
    made = 0
    for rowid in rowids:
        if made >= n:
            break
        title, url, body = backend.db.execute("SELECT title, url, body FROM passages WHERE rowid = ?", (rowid,)).fetchone()
        if split_of("search:" + url, val_fraction) != split:
            stats["other_split"] += 1
            continue
        sentences = [s.strip() for s in _SENTENCE.split(" ".join(body.split())) if _good_sentence(s.strip())]
        if not sentences:
            stats["no_sentence"] += 1
            continue
        sentence = rng.choice(sentences)
        words = salient_words(sentence)
        if len(words) < 2:
            stats["no_keywords"] += 1
            continue
        query = " ".join(words)
        output = tool.fn(query)
        hit = next((r for r in backend.search(query, k) if r.url == url), None)
        quote = " ".join(hit.snippet.split(" ")[:40]).strip(" …") if hit else ""
        if not quote or quote not in output:  # cut away by the token budget, or not retrieved at all
            stats["not_retrieved"] += 1
            continue
        if teacher is not None:
            from chatforge.tasks.teacher import teacher_question

            qa = teacher_question(teacher, sentence)
            if qa is None:
                stats["teacher_garbage"] += 1
                continue
            question = qa[0]
        else:
            question = rng.choice(_TEMPLATES).format(p=" ".join(words[:3]))
        stats["conversations"] += 1
        made += 1
        yield [
            {"role": "user", "content": question},
            {"role": "assistant", "content": rng.choice(["Let me search for that.", "I'll check the index.", ""]),
             "tool_calls": [{"name": "search", "arguments": query}]},
            {"role": "tool", "name": "search", "content": output},
            {"role": "assistant", "content": f"I found this in \"{title}\" ({url}): \"{quote}\""},
        ]
