"""PII masking, table-driven: which e-mail, IP and phone formats are masked, and which look-alikes are
deliberately left alone (each with the reason). `PIIMasker` runs the three maskers in order, so every
row goes through the same path the data pipeline uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chatforge.data.pii import (EMAIL_PLACEHOLDER, IPV4_PLACEHOLDER, IPV6_PLACEHOLDER, PHONE_PLACEHOLDER,
                                PIIMasker)

E, V4, V6, P = EMAIL_PLACEHOLDER, IPV4_PLACEHOLDER, IPV6_PLACEHOLDER, PHONE_PLACEHOLDER

# (text, expected text after masking)
MASKED = [
    # e-mail
    ("write to jane.doe@example.org today", f"write to {E} today"),
    ("first.last+tag@mail.uni-x.co.uk", E),
    ("UPPER_CASE@EXAMPLE.COM", E),
    ("mail me at bob@example.com.", f"mail me at {E}."),  # sentence-final period stays outside
    ("<a href='mailto:ops@example.net'>", f"<a href='mailto:{E}'>"),
    ("(contact: x_y-z%1@sub.example.io)", f"(contact: {E})"),
    # IPv4, public only
    ("server at 8.8.8.8.", f"server at {V4}."),  # issue #10: a period after the address
    ("dns 8.8.8.8, 1.1.1.1; done", f"dns {V4}, {V4}; done"),
    ("connect to 93.184.216.34:443 now", f"connect to {V4}:443 now"),
    ("http://93.184.216.34/index.html", f"http://{V4}/index.html"),
    ("block 203.0.114.0/24 (spam)", f"block {V4}/24 (spam)"),
    ("(8.8.4.4)", f"({V4})"),
    ("ip=8.8.8.8!", f"ip={V4}!"),
    # IPv6, public (global unicast 2000::/3) only
    ("v6 2606:4700:4700::1111.", f"v6 {V6}."),
    ("2001:4860:4860:0000:0000:0000:0000:8888", V6),
    ("[2a00:1450:4001:82a::200e]:443", f"[{V6}]:443"),
    # phone numbers
    ("call (415) 555-2671", f"call {P}"),
    ("call (283)-182-3829.", f"call {P}."),  # issue #10: a dash after the parenthesised area code
    ("415-555-2671 or 415.555.2671 or 415 555 2671", f"{P} or {P} or {P}"),
    ("toll free 1-800-555-0199", f"toll free {P}"),
    ("+1 415 555 2671; +1-415-555-2671; +1 (415) 555-2671", f"{P}; {P}; {P}"),
    ("tel:+14155552671", f"tel:{P}"),
    ("UK +44 20 7946 0958, +44 (0)20 7946 0958", f"UK {P}, {P}"),
    ("DE +49 30 901820. FR +33 1 42 68 53 00.", f"DE {P}. FR {P}."),
]

# Deliberately left alone, with the reason.
KEPT = [
    ("not a@b, icon@2x.png, user@localhost", "no dotted domain, or an image name"),
    ("jane (at) example (dot) com", "obfuscated addresses are not addresses"),
    ("josé@exämple.de", "internationalised (non-ASCII) addresses are not matched"),
    ("lan 192.168.0.1, 10.0.0.7, 172.16.5.4, lo 127.0.0.1, 0.0.0.0, 255.255.255.255",
     "private, loopback, unspecified and broadcast addresses name no one"),
    ("fe80::1, ::1, fc00::7, 2001:db8::42", "link-local, loopback, unique-local and documentation IPv6"),
    ("Python 3.11.7. was released; see 1.2.3.4.5 and v1.2.3.4", "version numbers: 3 or 5 parts, or a v prefix"),
    ("999.1.1.1 and 08.08.08.08", "not a valid address / leading zeros (ambiguous octal)"),
    ("std::vector, Cafe::Add, dead::beef, at 12:30:45, mac 00:1a:2b:3c:4d:5e",
     "C++ scopes, hex words, times and MAC addresses are not public IPv6"),
    ("on 2024-01-15. and 12.31.2024 or 2024.01.15", "dates"),
    ("order 4155552671, id 123456789, pi 3.14159", "bare digit runs are ids, not phones"),
    ("ISBN 978-3-16-148410-0, SSN-like 123-45-6789", "other number shapes"),
    ("local 555-2671, UK national 020 7946 0958", "numbers without an area code or international prefix"),
    ("+1 234 567 890 123 456 789", "more digits than E.164's 15"),
]


def mask(text: str) -> tuple[str, dict]:
    doc = SimpleNamespace(text=text, meta={})
    PIIMasker()(doc)
    return doc.text, doc.meta


@pytest.mark.parametrize("text,expected", MASKED, ids=[t for t, _ in MASKED])
def test_masked(text, expected):
    out, counts = mask(text)
    assert out == expected
    placeholders = sum(out.count(p) for p in (E, V4, V6, P))
    assert sum(counts.values()) == placeholders


@pytest.mark.parametrize("text,why", KEPT, ids=[w for _, w in KEPT])
def test_left_alone(text, why):
    out, counts = mask(text)
    assert (out, sum(counts.values())) == (text, 0), why
