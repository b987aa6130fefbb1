"""PII masking: e-mail addresses, public IP addresses, phone numbers -> placeholders, with counts.

FineWeb masks e-mails and IPs with datatrove's PIIFormatter; we add phone numbers. Placeholders
are well-formed values reserved for documentation, so the text keeps its shape (a model still
learns what an address looks like) and no real person or host is named:

    e-mail  ->  email@example.com   (example.com is reserved, RFC 2606)
    IPv4    ->  192.0.2.1           (TEST-NET-1, RFC 5737)
    IPv6    ->  2001:db8::1         (documentation prefix, RFC 3849)
    phone   ->  555-0100            (NANP's fictional 555-01xx block)

Only public addresses are masked: private (10/8, 192.168/16, fc00::/7), loopback, link-local and
other special-purpose ranges identify no one, and documentation about them (`127.0.0.1`) is useful.
What is deliberately left alone (obfuscated or non-ASCII e-mails, version numbers, dates, times, MAC
addresses, bare digit runs, numbers without area code or `+` prefix) is listed in tests/test_pii.py.
Each function returns `(new_text, count)`.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL_PLACEHOLDER = "email@example.com"
IPV4_PLACEHOLDER = "192.0.2.1"
IPV6_PLACEHOLDER = "2001:db8::1"
PHONE_PLACEHOLDER = "555-0100"

# local@domain.tld with a letters-only TLD; "a@b" and file names like "icon@2x.png" are left alone.
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".css", ".js", ".ico", ".pdf")
EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
# Four dotted octets, not inside a longer dotted run (a version "1.2.3.4.5", a hostname "1.2.3.4.nip.io"); a
# period after the address ends a sentence ("server at 8.8.8.8.") and does not protect it.
IPV4_RE = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\w)")
# Candidate IPv6: hex groups with colons (incl. "::" compression); ipaddress decides validity.
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# Phone numbers: an international number (+CC then 6-14 digits in groups), or a North American
# number with separators ((415) 555-2671, (283)-182-3829, 415.555.2671, 1-800-555-0199). Bare digit runs
# (IDs, prices, years) are not phone numbers: we require a leading '+' or the 3-3-4 shape with separators.
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    r")(?![\w-])"
)


def _mask(pattern: re.Pattern, text: str, placeholder: str, keep) -> tuple[str, int]:
    """Replace each match of `pattern` with `placeholder` unless keep(match_text); count replacements.

    >>> _mask(re.compile(r"\\d+"), "a 1 b 22", "#", keep=lambda s: len(s) > 1)
    ('a # b 22', 1)
    """
    n = 0

    def repl(m: re.Match) -> str:
        nonlocal n
        if keep(m.group(0)):
            return m.group(0)
        n += 1
        return placeholder

    return pattern.sub(repl, text), n


def mask_emails(text: str, placeholder: str = EMAIL_PLACEHOLDER) -> tuple[str, int]:
    """
    >>> mask_emails("write to jane.doe@uni-x.edu or x@2x.png")
    ('write to email@example.com or x@2x.png', 1)
    """
    # "logo@2x.png" is a retina image name, not an address
    return _mask(EMAIL_RE, text, placeholder, keep=lambda s: s.lower().endswith(FILE_SUFFIXES))


# IANA has allocated only 2000::/3 for global unicast (RFC 4291 §2.4; iana.org ipv6-unicast-address-assignments),
# so a "public" IPv6 address outside it is a look-alike: "Cafe::Add", "dead::beef" parse as IPv6 and count as
# is_global in Python, but name no host.
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


def _is_public(addr: str) -> bool:
    """True for an address that can name a host on the internet.

    >>> _is_public("8.8.8.8"), _is_public("10.0.0.1"), _is_public("2606:4700::1111"), _is_public("dead::beef")
    (True, False, True, False)
    """
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.is_global and (ip.version == 4 or ip in GLOBAL_UNICAST_V6)


def mask_ips(text: str, v4: str = IPV4_PLACEHOLDER, v6: str = IPV6_PLACEHOLDER) -> tuple[str, int]:
    """Mask public IPv4 and IPv6 addresses; private, loopback and reserved ones stay.

    >>> mask_ips("server 8.8.8.8, router 192.168.1.1, v6 2606:4700:4700::1111, lo ::1")
    ('server 192.0.2.1, router 192.168.1.1, v6 2001:db8::1, lo ::1', 2)
    """
    private = lambda s: not _is_public(s)  # noqa: E731
    text, n4 = _mask(IPV4_RE, text, v4, keep=private)
    n6 = 0
    if ":" in text:
        text, n6 = _mask(IPV6_RE, text, v6, keep=private)
    return text, n4 + n6


def mask_phone_numbers(text: str, placeholder: str = PHONE_PLACEHOLDER) -> tuple[str, int]:
    """
    >>> mask_phone_numbers("Call (415) 555-2671 or +44 20 7946 0958; order 12345678 in 2024.")
    ('Call 555-0100 or 555-0100; order 12345678 in 2024.', 2)
    """
    # E.164 numbers have at most 15 digits; fewer than 7 is not a phone number
    return _mask(PHONE_RE, text, placeholder, keep=lambda s: not 7 <= sum(c.isdigit() for c in s) <= 15)


class PIIMasker:
    """Apply the three maskers to `doc.text` and store the counts in `doc.meta` (pii_emails,
    pii_ips, pii_phones). Never drops a document."""

    name = "pii"

    def __init__(self, emails: bool = True, ips: bool = True, phones: bool = True):
        self.emails, self.ips, self.phones = emails, ips, phones

    def __call__(self, doc) -> dict[str, int]:
        counts = {"pii_emails": 0, "pii_ips": 0, "pii_phones": 0}
        text = doc.text
        if self.emails and "@" in text:
            text, counts["pii_emails"] = mask_emails(text)
        if self.ips:
            text, counts["pii_ips"] = mask_ips(text)
        if self.phones:
            text, counts["pii_phones"] = mask_phone_numbers(text)
        doc.text = text
        doc.meta.update(counts)
        return counts
