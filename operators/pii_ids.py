"""National identity numbers whose format carries a check rule, validated by python-stdnum (`stdnum`),
which implements each country's rule as the issuer defines it:

| recognizer | number                                   | check (stdnum module)                                    | found without context |
|------------|------------------------------------------|----------------------------------------------------------|-----------------------|
| `ca_sin`   | Canada, Social Insurance Number (SIN)    | Luhn, first digit not 0 or 8 (`stdnum.ca.sin`)           | no                    |
| `au_tfn`   | Australia, Tax File Number (TFN)         | weights 1 4 3 7 5 8 6 9 10, sum mod 11 (`stdnum.au.tfn`) | no                    |
| `ie_pps`   | Ireland, PPS number                      | check letter, weighted sum mod 23 (`stdnum.ie.pps`)      | no                    |
| `ch_ahv`   | Switzerland, AHV/AVS number (756...)     | EAN-13 check digit (`stdnum.ch.ssn`)                     | dotted 756.xxxx.xxxx.xx |
| `it_cf`    | Italy, codice fiscale                    | check letter, odd/even tables mod 26, birth date         | yes (16 characters)   |
|            |                                          | (`stdnum.it.codicefiscale`)                              |                       |
| `nl_bsn`   | Netherlands, burgerservicenummer (BSN)   | 11-proof (`stdnum.nl.bsn`)                               | no                    |

A check digit alone passes about one random number in ten, and nine plain digits are as often an order
or a phone number as an ID: a number is found only when its own context word ("SIN", "tax file number",
"PPS", "AHV", "codice fiscale", "BSN", ...) stands within `window` characters before it, except the two
written forms no other number takes (found without one, at a lower score). Matches are NATIONAL_ID,
validated; operators/pii_patterns.py runs them with its other recognizers and gives `CONTEXT_WORDS` to
its context-only ID recognizer (an ID-shaped number after "SIN" that fails the check is still reported,
unvalidated).

>>> [(m.recognizer, m.text, m.score) for m in find_country_ids("my SIN is 130 692 544, Mario RSSMRA85T10A562S")]
[('ca_sin', '130 692 544', 1.0), ('it_cf', 'RSSMRA85T10A562S', 0.95)]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from stdnum.au import tfn
from stdnum.ca import sin
from stdnum.ch import ssn
from stdnum.ie import pps
from stdnum.it import codicefiscale
from stdnum.nl import bsn

from operators.pii_spans import PatternMatch

# a number is not part of a longer token: no word character or joined digit group on either side
_BEFORE, _AFTER = r"(?<![\w.-])", r"(?![\w]|[.-]\w)"


@dataclass(frozen=True)
class NationalIdFormat:
    """One country's number: where candidates are, how they are checked, which words announce them."""

    recognizer: str
    shape: re.Pattern[str]  # candidate spans
    is_valid: Callable[[str], bool]  # stdnum's check of the number as written (it strips separators)
    words: tuple[str, ...]  # context words, lowercase; also given to the generic context-only recognizer
    upper_only: frozenset[str] = frozenset()  # words that count only in capitals ("SIN", not "sin")
    own_words: tuple[str, ...] = ()  # words too ambiguous for the generic recognizer ("NAS", "CF")
    free: re.Pattern[str] | None = None  # a written form found without a context word


def _cf_valid(number: str) -> bool:
    return len(number) == 16 and codicefiscale.is_valid(number)  # 11 digits would be a VAT number


FORMATS = (
    NationalIdFormat(
        "ca_sin", re.compile(_BEFORE + r"\d{3}([ -]?)\d{3}\1\d{3}" + _AFTER), sin.is_valid,
        ("sin", "s.i.n.", "social insurance number", "social insurance no", "social insurance",
         "numéro d'assurance sociale", "numéro d’assurance sociale", "assurance sociale"),
        frozenset({"sin", "nas"}), own_words=("nas",)),
    NationalIdFormat(
        "au_tfn", re.compile(_BEFORE + r"\d{3}([ -]?)\d{3}\1\d{2,3}" + _AFTER), tfn.is_valid,
        ("tfn", "tax file number", "tax file no", "tax file")),
    NationalIdFormat(
        "ie_pps", re.compile(_BEFORE + r"\d{7}[ -]?[A-W][ABHWTX]?" + _AFTER, re.IGNORECASE),
        lambda n: pps.is_valid(n.upper()),
        ("pps", "ppsn", "pps number", "pps no", "personal public service number", "personal public service"),
        frozenset({"pps"})),
    NationalIdFormat(
        "ch_ahv", re.compile(_BEFORE + r"756([. ]?)\d{4}\1\d{4}\1\d{2}" + _AFTER), ssn.is_valid,
        ("ahv", "avs", "ahv-nr", "ahv-nummer", "avs-nr", "numéro avs", "ahv number", "avs number",
         "sozialversicherungsnummer", "versichertennummer", "numéro d'assuré", "numero avs"),
        frozenset({"avs"}), free=re.compile(r"756\.\d{4}\.\d{4}\.\d{2}")),
    NationalIdFormat(
        "it_cf", re.compile(r"(?<![A-Za-z0-9])[A-Z]{6}[0-9LMNPQRSTUV]{2}[ABCDEHLMPRST][0-9LMNPQRSTUV]{2}[A-Z]"
                            r"[0-9LMNPQRSTUV]{3}[A-Z](?![A-Za-z0-9])", re.IGNORECASE), _cf_valid,
        ("codice fiscale", "cod. fiscale", "fiscal code", "tessera sanitaria"),
        frozenset({"cf", "c.f."}), own_words=("cf", "c.f."), free=re.compile(r"[A-Z0-9]{16}", re.IGNORECASE)),
    NationalIdFormat(
        "nl_bsn", re.compile(_BEFORE + r"(?:\d{9}|\d{4}([. ])\d{2}\1\d{3}|\d{3}([ -])\d{3}\2\d{3})" + _AFTER),
        bsn.is_valid,
        ("bsn", "burgerservicenummer", "burgerservice nummer", "sofinummer", "sofi-nummer", "sofi nummer",
         "citizen service number"),
        frozenset({"bsn"})),
)

CONTEXT_WORDS = tuple(dict.fromkeys(w for f in FORMATS for w in f.words))
UPPER_ONLY = frozenset(w for f in FORMATS for w in f.upper_only if w in f.words)


def _words_re(words: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return re.compile(r"(?<![\w])(" + alternatives + r")(?![\w])", re.IGNORECASE)


_CONTEXT = {f.recognizer: _words_re(f.words + f.own_words) for f in FORMATS}


def has_context(fmt: NationalIdFormat, text: str, start: int, window: int) -> bool:
    """One of the format's own words stands within `window` characters before `start`."""
    before = text[max(0, start - window) : start]
    return any(w.group(1).lower() not in fmt.upper_only or w.group(1).isupper()
               for w in _CONTEXT[fmt.recognizer].finditer(before))


def find_country_ids(text: str, window: int = 48) -> list[PatternMatch]:
    """Every number of FORMATS in `text` that passes its check and has its context word before it (1.0),
    or is written in its context-free form (0.95). Overlaps are left to the caller's `resolve`."""
    found = []
    for fmt in FORMATS:
        for m in fmt.shape.finditer(text):
            if not fmt.is_valid(m.group()):
                continue
            if has_context(fmt, text, m.start(), window):
                score = 1.0
            elif fmt.free is not None and fmt.free.fullmatch(m.group()):
                score = 0.95
            else:
                continue
            found.append(PatternMatch("NATIONAL_ID", m.group(), m.start(), m.end(), score, True, fmt.recognizer))
    return found
