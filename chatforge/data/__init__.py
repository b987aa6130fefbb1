"""The web data pipeline, as a library: WARC reading, HTML extraction, language ID, quality filters,
PII masking, deduplication and executors. `chatforge.stages.data` puts them together into the
`chatforge data process` stage; each piece is usable on its own:

    from chatforge.data import extract_text, identify_language, mask_emails
    text = extract_text(html_bytes)
    lang, score = identify_language(text)
    text, n = mask_emails(text)

Heavy dependencies (fastwarc, resiliparse, fastText) are imported by the submodules that need them,
from the `data` extra: `pip install 'chatforge[data]'`.
"""

from chatforge.data.dedup import MinHasher, cluster_duplicates, dedup_files, dedup_lines, exact_hash, normalize_text
from chatforge.data.extract import extract_text
from chatforge.data.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                    GopherRepetitionFilter, URLFilter, split_words)
from chatforge.data.langid import LanguageFilter, identify_language
from chatforge.data.pii import PIIMasker, mask_emails, mask_ips, mask_phone_numbers
from chatforge.data.warc import Page, decode_html, iter_pages

__all__ = [
    "C4QualityFilter", "FineWebQualityFilter", "GopherQualityFilter", "GopherRepetitionFilter", "LanguageFilter",
    "MinHasher", "PIIMasker", "Page", "URLFilter", "cluster_duplicates", "decode_html", "dedup_files", "dedup_lines",
    "exact_hash", "extract_text", "identify_language", "iter_pages", "mask_emails", "mask_ips",
    "mask_phone_numbers", "normalize_text", "split_words",
]
