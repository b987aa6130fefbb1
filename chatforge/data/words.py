"""Word splitting for the quality filters: spaCy's English tokenizer rules, without spaCy.

Gopher's and FineWeb's statistics (alpha-word ratio, mean word length, n-gram repetition, newlines per
word) depend on what counts as a word. FineWeb's datatrove pipeline splits words with spaCy's blank
English tokenizer (`datatrove.utils.word_tokenizers.SpaCyTokenizer`); a plain `\\w+|[^\\w\\s]+` regex
disagrees with it on code-heavy pages (it splits `os.path.join` into five words where spaCy keeps one,
and keeps `()` as one word where spaCy makes two), which moved Gopher's alpha-word ratio across its
0.8 threshold for ~20% of the documentation pages in the benchmark.

So this module ports spaCy's tokenizer algorithm (`spacy/tokenizer.pyx`, `_split_affixes` and
`_attach_tokens`; MIT license) with its English rules (`spacy/lang/punctuation.py`,
`spacy/lang/en/punctuation.py`, `spacy/lang/tokenizer_exceptions.py`): split on whitespace; for each
chunk peel prefixes (`(`, `"`, `$`, ...) and suffixes (`)`, `,`, `'s`, a `.` after a lowercase letter,
...) until a special case (`don't`, `e.g.`, `:)`) or nothing is left; keep URLs whole; split what
remains at infixes (`well-known`, `end.Next`, `a,b`, `x=y`). Letter classes use Unicode properties
instead of spaCy's hand-built ranges. Chunks repeat a lot, so each distinct chunk is tokenized once
per process (a bounded cache, as spaCy does), which makes this about as fast as one regex pass.

Measured against spaCy 3.8.18 (bench/RESULTS.md, tests/test_data_words.py): the same tokens on 1,131 of the
1,133 texts both extractors make of the benchmark's pages, and the same filter decisions on all of them;
1.2 s for the 566 resiliparse texts with a cold cache (spaCy via datatrove: 18 s).
"""

from __future__ import annotations

import unicodedata
from itertools import chain

import regex

from chatforge.data._spacy_en_exceptions import KEEP, SPLIT

# -- spaCy's character classes (spacy/lang/char_classes.py), Unicode properties for its letter ranges
_PUNCT = r"… …… , : ; \! \? ¿ ؟ ¡ \( \) \[ \] \{ \} < > _ # \* & 。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪".split()
_QUOTES = r'\' " ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 〈 〉 ⟦ ⟧'.split()
_CURRENCY = r"\$ £ € ¥ ฿ US\$ C\$ A\$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ € ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₴ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₽ ₾ ₿".split()
_UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h "
          "kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %").split()
_ELLIPSES = [r"\.\.+", "…"]
_ICONS = [r"\p{So}"]  # "other symbols": dingbats, emoji, the degree sign
_HYPHENS = "-|–|—|--|---|——|~"
_Q = "".join(_QUOTES)  # inside a character class
_A, _AL, _AU = r"\p{L}", r"\p{Ll}", r"\p{Lu}"

_PREFIXES = ["§", "%", "=", "—", "–", r"\+(?![0-9])"] + _PUNCT + _ELLIPSES + _QUOTES + _CURRENCY + _ICONS
_SUFFIXES = _PUNCT + _ELLIPSES + _QUOTES + _ICONS + ["'s", "'S", "’s", "’S", "—", "–"] + [
    r"(?<=[0-9])\+",
    r"(?<=°[FfCcKk])\.",
    r"(?<=[0-9])(?:{})".format("|".join(_CURRENCY)),
    r"(?<=[0-9])(?:{})".format("|".join(_UNITS)),
    r"(?<=[0-9{al}%²\-\+{p}(?:|){q}])\.".format(al=_AL, p="".join(_PUNCT), q=_Q),
    r"(?<=[{au}][{au}])\.".format(au=_AU),
]
_INFIXES = _ELLIPSES + _ICONS + [
    r"(?<=[0-9])[+\-\*^](?=[0-9-])",
    r"(?<=[{al}{q}])\.(?=[{au}{q}])".format(al=_AL, au=_AU, q=_Q),
    r"(?<=[{a}]),(?=[{a}])".format(a=_A),
    r"(?<=[{a}0-9])(?:{h})(?=[{a}])".format(a=_A, h=_HYPHENS),
    r"(?<=[{a}0-9])[:<>=/](?=[{a}])".format(a=_A),
]
_prefix = regex.compile("|".join(_PREFIXES)).match
# Every suffix alternative ends at the end of the string, so only the start position matters (the
# leftmost wins); the one-character alternatives become one character class, which is ~4x faster.
_ONE_CHAR = [p for p in _SUFFIXES if len(p.replace("\\", "")) == 1]
_suffix_search = regex.compile("(?:[{}]|{})$".format(
    "".join(regex.escape(p.replace("\\", "")) for p in _ONE_CHAR),
    "|".join(p for p in _SUFFIXES if p not in _ONE_CHAR))).search


_DIGITS = frozenset("0123456789")


def _suffix(s: str):
    """The leftmost suffix match, as spaCy's `suffix_search`. Suffixes are short, so the search
    starts near the end (lookbehinds still see the characters before); only a run of dots can
    start further left."""
    if not s:
        return None
    c = s[-1]
    if c.isalnum():  # then only "'s" or a unit after a number ("10km") can match: skip the search
        tail = s[-7:-1]
        if not (c in "sS" and tail[-1:] in ("'", "’")) and not any(ch in _DIGITS for ch in tail):
            return None
    start = max(0, len(s) - 8)
    m = _suffix_search(s, start)
    if m is not None and start and m.start() == start and s[start] == ".":
        m = _suffix_search(s)
    return m
_infixes = regex.compile("|".join(_INFIXES)).finditer
# spacy/lang/tokenizer_exceptions.py URL_PATTERN: URLs and domain names stay one word.
_url = regex.compile(
    r"^(?:(?:[\w\+\-\.]{2,})://)?(?:\S+(?::\S*)?@)?(?:"
    r"(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
    r"(?!172\.(?:1[6-9]|2\d|3[0-1])(?:\.\d{1,3}){2})(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])"
    r"(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))"
    r"|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
    r"(?:\p{Ll}{2,63}))(?::\d{2,5})?(?:[/?#]\S*)?$").match

_SPECIAL = dict(SPLIT)
_SPECIAL.update({k: (k,) for k in KEEP})


def _split(s: str, special: dict) -> list[str]:
    """tokenizer.pyx `_split_affixes` + `_attach_tokens` for one whitespace-free string."""
    prefixes: list[str] = []
    suffixes: list[str] = []
    last = 0
    while s and len(s) != last:
        if s in special:
            break
        last = len(s)
        m = _prefix(s)
        pre_len = m.end() - m.start() if m else 0
        if pre_len:
            prefix, minus_pre = s[:pre_len], s[pre_len:]
            if minus_pre and minus_pre in special:
                s = minus_pre
                prefixes.append(prefix)
                break
        m = _suffix(s[pre_len:])
        suf_len = m.end() - m.start() if m else 0
        if suf_len:
            suffix, minus_suf = s[-suf_len:], s[:-suf_len]
            if minus_suf and minus_suf in special:
                s = minus_suf
                suffixes.append(suffix)
                break
        if pre_len and suf_len and pre_len + suf_len <= len(s):
            s = s[pre_len:-suf_len]
            prefixes.append(prefix)
            suffixes.append(suffix)
        elif pre_len:
            s = minus_pre
            prefixes.append(prefix)
        elif suf_len:
            s = minus_suf
            suffixes.append(suffix)
        if s in special:
            break
    out = prefixes
    if s:
        if s in special:
            out.extend(special[s])
        elif _url(s):
            out.append(s)
        else:
            start = 0
            for m in _infixes(s):
                a, b = m.span()
                if a == 0:  # an infix at the very start is not a split point
                    continue
                if a != start:
                    out.append(s[start:a])
                if a != b:
                    out.append(s[a:b])
                start = b
            if s[start:]:
                out.append(s[start:])
    out.extend(reversed(suffixes))
    return out


# Special cases made of affixes (":)", "):", "''", "e.g." after a bracket...) are found again among the
# tokens of a chunk and merged, longest first (tokenizer.pyx `_apply_special_cases`).
_MATCH = {tuple(_split(k, {})): k for k in _SPECIAL if _prefix(k) or _suffix(k) or any(_infixes(k))}
_MATCH_MAX = max(map(len, _MATCH))
_MATCH_FIRST = frozenset(k[0] for k in _MATCH)


def tokenize_chunk(s: str) -> tuple[str, ...]:
    """spaCy's tokens for one whitespace-free string.

    >>> tokenize_chunk("(os.path.join()).")
    ('(', 'os.path.join', '(', ')', ')', '.')
    >>> tokenize_chunk("don't")
    ('do', "n't")
    >>> tokenize_chunk("f(a):")
    ('f(a', '):')
    """
    if s in _SPECIAL:
        return _SPECIAL[s]
    if s.isalpha():  # no prefix, suffix or infix can match: one word
        return (s,)
    head, last = s[:-1], s[-1]  # "word," "word." (the commonest case)
    if head.isalpha() and head not in _SPECIAL and (
            last in ",;:!?)" or last == "." and (head[-1].islower() or head[-2:].isupper() and len(head) > 1)):
        return head, last
    out = _split(s, _SPECIAL)
    n = len(out)
    if n < 2:
        return tuple(out)
    spans = [(i, j) for i in range(n) if out[i] in _MATCH_FIRST
             for j in range(i + 1, min(n, i + _MATCH_MAX) + 1) if tuple(out[i:j]) in _MATCH]
    if not spans:
        return tuple(out)
    taken = [False] * n
    chosen = []
    for i, j in sorted(spans, key=lambda x: (x[0] - x[1], x[0])):
        if not any(taken[i:j]):
            taken[i:j] = [True] * (j - i)
            chosen.append((i, j))
    res: list[str] = []
    pos = 0
    for i, j in sorted(chosen):
        res += out[pos:i]
        res += _SPECIAL[_MATCH[tuple(out[i:j])]]
        pos = j
    res += out[pos:]
    return tuple(res)


_CACHE: dict[str, tuple[str, ...]] = {}
_CACHE_MAX = 200_000  # distinct chunks (~250 B each); cleared when full


def split_words(text: str) -> list[str]:
    """Words as spaCy's English tokenizer (datatrove's word splitter for FineWeb) makes them.

    >>> split_words("Don't call os.path.join() -- it's well-known...")
    ['Do', "n't", 'call', 'os.path.join', '(', ')', '--', 'it', "'s", 'well', '-', 'known', '...']
    """
    chunks = text.split()
    cache = _CACHE
    toks = list(map(cache.get, chunks))
    if None in toks:
        for i, t in enumerate(toks):
            if t is None:
                w = chunks[i]
                t = cache.get(w)
                toks[i] = t if t is not None else cache.setdefault(w, tokenize_chunk(w))
        if len(cache) > _CACHE_MAX:  # after the text, so one huge text cannot grow it without bound twice
            cache.clear()
    return list(chain.from_iterable(toks))


# -- sentences and punctuation, as FineWeb's datatrove pipeline defines them -------------------------

# spaCy's Sentencizer.default_punct_chars: a token made of one of these ends a sentence.
SENTENCE_PUNCT = frozenset(
    "!.?\u0589\u061f\u06d4\u0700\u0701\u0702\u07f9\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735"
    "\u1736\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1c3b\u1c3c\u1c7e\u1c7f"
    "\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f"
    "\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\U00010a56\U00010a57"
    "\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5"
    "\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b"
    "\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf"
    "\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642"
    "\U0001173c\U0001173d\U0001173e\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00016a6e"
    "\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U0001bc9f\U0001da88\uff61\u3002")
# datatrove.utils.text.TERMINAL_PUNCTUATION (FineWeb's "line ends in terminal punctuation"): the above
# plus a few marks of newer Unicode versions.
TERMINAL_PUNCTUATION = tuple(sorted(SENTENCE_PUNCT | frozenset(
    "\u061d\u061e\u0837\u0839\u083d\u083e\u17d4\u17d5\u17d6\u17d9\u17da\u1b7d\u1b7e\u2e53\u2e54\U00010f55"
    "\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011944\U00011946"
    "\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016e98")))
# datatrove.utils.text.PUNCTUATION_SET: a word made only of these is a symbol, not a word, for Gopher's
# word count and mean word length (note: "¶", "©", "§" are not in it; control characters are).
PUNCTUATION = frozenset(
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a"
    "\u201e';\u2019{|\u2236\xb4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\xab\u3009,><\u300b)?\uff09"
    "\u3002\u2026@_.\"}\u25ba\xbb" + "".join(map(chr, [*range(0, 9), 11, 12, *range(13, 32), *range(127, 160)]))
) | frozenset(TERMINAL_PUNCTUATION)


def is_symbol(word: str) -> bool:
    """A word made only of punctuation (datatrove's PUNCTUATION_SET).

    >>> is_symbol("--"), is_symbol("¶"), is_symbol("a.")
    (True, False, False)
    """
    return all(c in PUNCTUATION for c in word)


def _all_punct(tok: str) -> bool:  # spaCy's Token.is_punct: every character of a P* category
    return all(unicodedata.category(c)[0] == "P" for c in tok)


def count_sentences(line: str) -> int:
    """Sentences in one line as spaCy's Sentencizer splits them (datatrove's C4 filter counts this way): a
    new sentence starts at the first non-punctuation token after a token of SENTENCE_PUNCT; so
    "Wait... no" (an ellipsis token) and "3.5" are one sentence.

    >>> count_sentences("One. Two! Three"), count_sentences("See e.g. this."), count_sentences("")
    (3, 1, 0)
    """
    toks = split_words(line)
    n = 1 if toks else 0
    seen = False
    for t in toks:
        if t in SENTENCE_PUNCT:
            seen = True
        elif seen and not _all_punct(t):
            n += 1
            seen = False
    return n
