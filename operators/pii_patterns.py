"""Validated recognizers for structured PII, the way people type it: pure functions over one string.

Each recognizer finds candidate character spans with a regex compiled once, then validates them with
the format's own rule, so a number that only looks like PII is dropped:

| type             | found by                                                   | validated by                              |
|------------------|------------------------------------------------------------|-------------------------------------------|
| `EMAIL`          | address regex; "name at host dot com" spelled out           | TLD letters, no empty or dotted-edge parts |
| `PHONE`          | `phonenumbers.PhoneNumberMatcher` per configured region     | libphonenumber validity (or a phone word)  |
| `CARD`           | 13-19 digits, spaced or dashed consistently                 | Luhn + known IIN range and length          |
| `IBAN`           | two letters, two check digits, country-length body          | per-country length + ISO 7064 mod-97       |
| `NATIONAL_ID`    | US SSN, UK NI number, Spanish DNI/NIE, French NIR; CA SIN,   | SSN invalid ranges, NI prefix rules, check |
|                  | AU TFN, IE PPS, CH AHV, IT codice fiscale, NL BSN (pii_ids); | letters/keys; stdnum's checks (pii_ids);   |
|                  | any ID number after a context word ("ID card", "SSN")        | context words otherwise                    |
| `PASSPORT`       | an ID-shaped token after "passport", "Reisepass", ...        | context only (score below validated ones)  |
| `DRIVER_LICENSE` | an ID-shaped token after "driver's license", "DL", ...       | context only                               |
| `IP_ADDRESS`     | IPv6; IPv4 after "ip", "server", "ssh", ... (optional type)  | `ipaddress`; versions ("v1.2.3.4") skipped |
| `URL_CREDENTIALS`| `scheme://user:password@host` (optional type)               | regex                                      |

Every match is a `PatternMatch`: type, `text == original[start:end]`, score in [0, 1], whether a checksum
or format rule validated it (the merge with the NER model ranks validated spans first), and which
recognizer found it.

>>> [(m.type, m.text) for m in find_pii("card 4111 1111 1111 1111, mail me: ann@example.org")]
[('CARD', '4111 1111 1111 1111'), ('EMAIL', 'ann@example.org')]
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from operators.pii_ids import CONTEXT_WORDS as COUNTRY_ID_WORDS
from operators.pii_ids import UPPER_ONLY as COUNTRY_ID_UPPER_ONLY
from operators.pii_ids import find_country_ids
from operators.pii_spans import PatternMatch, resolve

PATTERN_TYPES = ("EMAIL", "PHONE", "CARD", "IBAN", "NATIONAL_ID", "PASSPORT", "DRIVER_LICENSE",
                 "IP_ADDRESS", "URL_CREDENTIALS")
DEFAULT_TYPES = PATTERN_TYPES


@dataclass(frozen=True)
class PatternConfig:
    """What to look for. `regions`: ISO 3166 regions for national-format phone numbers, the first is
    the default; numbers written with + and a country code are found whatever the regions."""

    types: frozenset[str] = frozenset(DEFAULT_TYPES)
    regions: tuple[str, ...] = ("US",)
    context_window: int = 48  # characters before an ID in which its context word must appear

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PatternConfig:
        raw = dict(raw or {})
        unknown = set(raw) - {"types", "regions", "region", "context_window"}
        if unknown:
            raise ValueError(f"unknown pattern settings {sorted(unknown)}")
        types = frozenset(str(t) for t in raw.get("types", DEFAULT_TYPES))
        if types - set(PATTERN_TYPES):
            raise ValueError(f"unknown pattern types {sorted(types - set(PATTERN_TYPES))} (known: {', '.join(PATTERN_TYPES)})")
        regions = raw.get("regions", [raw["region"]] if "region" in raw else ["US"])
        regions = tuple(str(r).upper() for r in regions)
        bad = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if bad or not regions:
            raise ValueError(f"unknown phone regions {bad}")
        return cls(types, regions, int(raw.get("context_window", 48)))


# ------------------------------------------------------------------------------------------ checksums
def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) check over a string of digits.

    >>> luhn_valid("4111111111111111"), luhn_valid("4111111111111112")
    (True, False)
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# (IIN prefix range low, high, number of prefix digits, allowed lengths, network)
_IIN = (
    (4, 4, 1, (13, 16, 19), "visa"),
    (51, 55, 2, (16,), "mastercard"),
    (2221, 2720, 4, (16,), "mastercard"),
    (34, 34, 2, (15,), "amex"), (37, 37, 2, (15,), "amex"),
    (6011, 6011, 4, (16, 17, 18, 19), "discover"), (644, 649, 3, (16, 17, 18, 19), "discover"),
    (65, 65, 2, (16, 17, 18, 19), "discover"),
    (3528, 3589, 4, (16, 17, 18, 19), "jcb"),
    (300, 305, 3, (14, 15, 16, 17, 18, 19), "diners"), (36, 36, 2, (14, 15, 16, 17, 18, 19), "diners"),
    (38, 39, 2, (16, 17, 18, 19), "diners"),
    (62, 62, 2, (16, 17, 18, 19), "unionpay"),
    (50, 50, 2, tuple(range(13, 20)), "maestro"), (56, 69, 2, tuple(range(13, 20)), "maestro"),
)


def card_network(digits: str) -> str | None:
    """The card network whose IIN range and length fit `digits`, or None.

    >>> card_network("4111111111111111"), card_network("378282246310005"), card_network("1234567812345678")
    ('visa', 'amex', None)
    """
    for low, high, width, lengths, network in _IIN:
        if len(digits) in lengths and low <= int(digits[:width]) <= high:
            return network
    return None


# ISO 13616 IBAN registry: country -> total length
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_valid(compact: str) -> bool:
    """Country length and ISO 7064 mod-97 of an IBAN without spaces.

    >>> iban_valid("DE89370400440532013000"), iban_valid("DE89370400440532013001")
    (True, False)
    """
    compact = compact.upper()
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni_valid(number: str) -> bool:
    """Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter): the letter is the mod-23 check.

    >>> dni_valid("12345678Z"), dni_valid("X1234567L"), dni_valid("12345678A")
    (True, True, False)
    """
    number = number.upper()
    if number[0] in "XYZ":
        number = str("XYZ".index(number[0])) + number[1:]
    return number[:-1].isdigit() and _DNI_LETTERS[int(number[:-1]) % 23] == number[-1]


def nir_valid(number: str) -> bool:
    """French NIR (numéro de sécurité sociale): 13 characters (Corsica 2A/2B) + key = 97 - n mod 97."""
    body, key = number[:13].upper(), number[13:]
    body = body.replace("2A", "19").replace("2B", "18") if body[5:7] in ("2A", "2B") else body
    return body.isdigit() and key.isdigit() and 97 - int(body) % 97 == int(key)


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """US SSN ranges the SSA never issues: area 000, 666, 900-999; group 00; serial 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


_NI_BAD_PREFIXES = {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}


# -------------------------------------------------------------------------------------------- regexes
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
                    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_TLDS = r"(?:com|net|org|edu|gov|io|co|de|fr|es|uk|it|nl|me|info|dev|app|ai|ca|au|eu|ch|at|be|biz|us|tv|xyz)"
_EMAIL_SPELLED = re.compile(
    r"(?<![\w.])([A-Za-z0-9][A-Za-z0-9._+-]*(?:\s+dot\s+[A-Za-z0-9_+-]+)*)\s*(?:\[\s*at\s*\]|\(\s*at\s*\)|\s at \s|\{at\})\s*"
    r"([A-Za-z0-9-]+(?:\s*(?:\[\s*dot\s*\]|\(\s*dot\s*\)|\s dot \s|\.)\s*[A-Za-z0-9-]+)*?)"
    r"\s*(?:\[\s*dot\s*\]|\(\s*dot\s*\)|\s dot \s)\s*" + _TLDS + r"\b", re.IGNORECASE | re.VERBOSE)
_CARD = re.compile(r"(?<![\d-])\d{4}(?:([ -]?)\d{2,6})(?:\1\d{1,6}){0,4}(?![\d-])")
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{2})(\d{2})(?=[ -]?[A-Za-z0-9])")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ]?)(\d{2})\2(\d{4})(?![\d-])")
_NI = re.compile(r"(?<![A-Za-z0-9])([A-CEGHJ-TW-Z][A-CEGHJ-NPQR-TW-Z]) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])(?![A-Za-z0-9])",
                 re.IGNORECASE)
_DNI = re.compile(r"(?<![A-Za-z0-9])([XYZ]?\d{7,8})[ -]?([A-Z])(?![A-Za-z0-9])", re.IGNORECASE)
_NIR = re.compile(r"(?<!\d)([12]) ?(\d{2}) ?(\d{2}|2[AB]) ?(\d{2}|2[AB]) ?(\d{3}) ?(\d{3}) ?(\d{2})(?!\d)", re.IGNORECASE)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?:\bv|version|release|firmware|build|ver\.?|update)\s*$", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s:/@]+:[^\s/@]+@[^\s/?#]+[^\s]*")
_TRAILING = ".,;:!?)]}'\""
# An ID-shaped token: letters and digits, at least two digits, optionally in groups joined by one space
# or dash where every later group has a digit ("D123 4567", "533380006", "MORGA753116SM9IJ").
_ID_TOKEN = re.compile(r"(?<![\w-])(?=[A-Za-z0-9]*\d)[A-Za-z0-9]{1,20}(?:[ -](?=[A-Za-z]*\d)[A-Za-z0-9]{1,12}){0,6}(?![\w])")
_DATE_LIKE = re.compile(r"^(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,2}|\d{4})$")

# context words -> the type an ID-shaped token after them gets; longest phrases are tried first
_CONTEXT = {
    "PASSPORT": ["passport", "passport no", "passport number", "reisepass", "reisepassnummer", "passnummer",
                 "passeport", "pasaporte"],
    "DRIVER_LICENSE": ["driver's license", "drivers license", "driver license", "driving licence",
                       "driving license", "driver's licence", "drivers licence", "licence number",
                       "license number", "licence no", "license no", "dl", "dl#", "dl no", "führerschein",
                       "fuhrerschein", "führerscheinnummer", "permis de conduire", "permis", "carnet de conducir",
                       "permiso de conducir", "licencia de conducir"],
    "NATIONAL_ID": ["ssn", "social security", "social security number", "national insurance", "ni number",
                    "nino", "id card", "id number", "id no", "identity card", "national id", "personalausweis",
                    "ausweis", "ausweisnummer", "steuer-id", "steuer id", "steuerid", "steueridentifikationsnummer",
                    "tax id", "tax number", "dni", "nie", "nif", "carte d'identité", "carte d’identité", "cni",
                    "numéro de sécu", "sécurité sociale", "securite sociale", "insee", "bsn", "aadhaar",
                    "personnummer", "documento de identidad", *COUNTRY_ID_WORDS],
}
_CONTEXT_RE = re.compile(
    r"(?<![\w])(" + "|".join(sorted((re.escape(w) for ws in _CONTEXT.values() for w in ws), key=len, reverse=True))
    + r")(?![\w])", re.IGNORECASE)
_CONTEXT_TYPE = {w: t for t, ws in _CONTEXT.items() for w in ws}
_UPPER_ONLY = {"dl", "dl#", "dl no", "nie", "nif", "dni", "cni", "bsn", "nino", *COUNTRY_ID_UPPER_ONLY}  # "nie": never
_PHONE_WORDS = re.compile(r"(?<![\w])(?:phone|call|called|text|txt|sms|ring|mobile|cell|tel|whatsapp|landline|hotline|"
                          r"fax|telefon|telefonnummer|handy|handynummer|anrufen|ruf|téléphone|portable|tél|appelle|"
                          r"appelez|contactez|joindre|teléfono|móvil|llama|llámame|llamar)(?![\w])", re.IGNORECASE)
# weaker: also said of order, passport and model numbers
_PHONE_CONTEXT = re.compile(_PHONE_WORDS.pattern.replace("(?:", "(?:number|num|nummer|numéro|número|reach|contact|message|", 1),
                            re.IGNORECASE)
_NOT_PHONE_CONTEXT = re.compile(r"(?<![\w])(?:routing|account|acct|konto|kontonummer|order|bestellung|commande|pedido|"
                                r"tracking|invoice|inv|rechnung|factura|ref|reference|case|ticket|meeting id|"
                                r"passcode|serial|sku|isbn|iban|bic|sort code|blz|build|version|seed)(?![\w])",
                                re.IGNORECASE)
_TRUNK_ZERO = {"GB", "DE", "FR", "AT", "CH", "NL", "BE", "IT", "IE"}  # regions whose national numbers start with 0
_IP_CONTEXT = re.compile(r"(?<![\w])(?:ip|ips|server|host|ssh|ping|vpn|router|address|addr|connect|login|logged)(?![\w])",
                         re.IGNORECASE)


def _context_type(text: str, start: int, window: int) -> str | None:
    """The type named by the context word nearest before `start` within `window` characters."""
    before = text[max(0, start - window) : start]
    words = [w.group(1) for w in _CONTEXT_RE.finditer(before)
             if w.group(1).lower() not in _UPPER_ONLY or w.group(1).isupper()]
    return _CONTEXT_TYPE[words[-1].lower()] if words else None


# ----------------------------------------------------------------------------------------- recognizers
def find_emails(text: str) -> list[PatternMatch]:
    found = []
    for m in _EMAIL.finditer(text):
        local, _, domain = m.group().partition("@")
        if ".." in local or any(not p for p in domain.split(".")):
            continue
        found.append(PatternMatch("EMAIL", m.group(), m.start(), m.end(), 1.0, True, "email"))
    for m in _EMAIL_SPELLED.finditer(text):
        found.append(PatternMatch("EMAIL", m.group(), m.start(), m.end(), 0.85, False, "email_spelled"))
    return found


def _inside_token(text: str, start: int, end: int) -> bool:
    """The span continues a longer word or code on either side ("WD-5800-2147", "A1234567B")."""
    left = start > 0 and (text[start - 1].isalnum() or (text[start - 1] in "-/" and start > 1 and text[start - 2].isalnum()))
    right = end < len(text) and (text[end].isalnum() or (text[end] in "-/" and end + 1 < len(text) and text[end + 1].isalnum()))
    return left or right


def find_phones(text: str, regions: Sequence[str], window: int = 48) -> list[PatternMatch]:
    """libphonenumber's matcher once per region; a span found for an earlier region is kept.
    International (+CC) numbers are found whatever the region. Validated: libphonenumber calls the
    number valid; a merely possible one ("555.867.5309", unassigned ranges) counts, unvalidated, only
    right after a phone word. A national number of another region than the first needs its trunk 0
    ("07911 123456") or a phone word before it; a number right after an ID or order word ("Steuer-ID
    12 345 678 903", "routing 026009593") is not a phone."""
    if sum(ch.isdigit() for ch in text) < 7:  # the shortest numbers we look for; the matcher is slow
        return []
    found: dict[tuple[int, int], PatternMatch] = {}
    for i, region in enumerate(regions):
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            if (m.start, m.end) in found:
                continue
            if _inside_token(text, m.start, m.end):
                continue  # digits of a longer token ("1Z999AA10123456784", "WD-5800-2147")
            before = text[max(0, m.start - window) : m.start]
            international = m.raw_string.lstrip("(").startswith(("+", "00"))
            phone_word = _PHONE_CONTEXT.search(before)
            strong = [w.end() for w in _PHONE_WORDS.finditer(before)]
            if not international and i > 0 and not phone_word \
                    and not (region in _TRUNK_ZERO and m.raw_string.lstrip("(").startswith("0")):
                continue
            other = [w.end() for w in _CONTEXT_RE.finditer(before)] + [w.end() for w in _NOT_PHONE_CONTEXT.finditer(before)]
            if other and (not strong or max(other) > max(strong)):
                continue  # "Steuer-ID 12 345 678 903", "routing 026009593": that ID, not a phone
            near_phone_word = bool(strong) and max(strong) >= len(before) - 24
            valid = phonenumbers.is_valid_number(m.number)
            if not valid and not (near_phone_word and (international or i == 0)):
                continue  # a number libphonenumber cannot place counts only right after a phone word
            score = (0.95 if international or i == 0 else 0.9) if valid else 0.7
            found[(m.start, m.end)] = PatternMatch("PHONE", m.raw_string, m.start, m.end, score, valid, f"phone_{region}")
    return list(found.values())


_CARD_GROUPINGS = re.compile(r"^(?:\d{12,19}|(?:\d{4} ){2,3}\d{4}(?: \d{1,4})?|\d{4} \d{6} \d{4,5})$")


def find_cards(text: str) -> list[PatternMatch]:
    """A run of digit groups can hold a card beside other numbers ("4111 1111 1111 1111 12/27"): every
    contiguous sub-run of groups grouped the way cards are printed (4-4-4-4[-x], Amex 4-6-5, Diners
    4-6-4, or ungrouped) is tried, the longest valid one is kept."""
    found = []
    for m in _CARD.finditer(text):
        groups = [(g.start() + m.start(), g.end() + m.start()) for g in re.finditer(r"\d+", m.group())]
        best = None
        for i in range(len(groups)):
            for j in range(len(groups), i, -1):
                start, end = groups[i][0], groups[j - 1][1]
                digits = re.sub(r"\D", "", text[start:end])
                grouping = re.sub(r"[ -]", " ", text[start:end])
                if 12 <= len(digits) <= 19 and (best is None or end - start > best[1] - best[0]) \
                        and _CARD_GROUPINGS.match(grouping) and luhn_valid(digits) and card_network(digits):
                    best = (start, end, card_network(digits))
        if best:
            start, end, network = best
            found.append(PatternMatch("CARD", text[start:end], start, end, 1.0, True, f"card_{network}"))
    return found


def find_ibans(text: str) -> list[PatternMatch]:
    """Walk from a country code over letters and digits (single spaces or dashes allowed between them)
    until the country's length is reached, so a following word never joins the IBAN."""
    found = []
    for m in _IBAN_START.finditer(text):
        country = m.group(1).upper()
        length = IBAN_LENGTHS.get(country)
        if length is None:
            continue
        chars, i = [], m.start()
        while i < len(text) and len(chars) < length:
            ch = text[i]
            if ch.isascii() and ch.isalnum():
                chars.append(ch)
            elif not (ch in " -" and chars and i + 1 < len(text) and text[i + 1].isalnum()):
                break
            i += 1
        if len(chars) == length and not (i < len(text) and text[i].isalnum()) and iban_valid("".join(chars)):
            found.append(PatternMatch("IBAN", text[m.start() : i], m.start(), i, 1.0, True, f"iban_{country}"))
    return found


def find_national_ids(text: str, window: int) -> list[PatternMatch]:
    """Formats with a check rule, found anywhere: US SSN (separated 3-2-4; nine plain digits only after
    a context word), UK NI number, Spanish DNI/NIE, French NIR."""
    found = []
    for m in _SSN.finditer(text):
        area, sep, group, serial = m.groups()
        if not ssn_valid(area, group, serial):
            continue
        context = _context_type(text, m.start(), window) == "NATIONAL_ID"
        if sep or context:
            found.append(PatternMatch("NATIONAL_ID", m.group(), m.start(), m.end(), 1.0 if context else 0.9, True, "us_ssn"))
    for m in _NI.finditer(text):
        prefix = m.group(1).upper()
        if prefix in _NI_BAD_PREFIXES or (prefix[0] in "DFIQUV" and prefix != "QQ"):
            continue
        if not (m.group().isupper() or m.group().islower()) and not _context_type(text, m.start(), window):
            continue  # mixed case ("Ab123456c") is prose, not an NI number, unless a context word says so
        context = _context_type(text, m.start(), window) == "NATIONAL_ID"
        found.append(PatternMatch("NATIONAL_ID", m.group(), m.start(), m.end(), 1.0 if context else 0.9, True, "uk_nino"))
    for m in _DNI.finditer(text):
        number = m.group(1) + m.group(2)
        if (len(m.group(1)) == 8 or m.group(1)[0] in "XYZxyz") and dni_valid(number):
            found.append(PatternMatch("NATIONAL_ID", m.group(), m.start(), m.end(), 0.95, True, "es_dni"))
    for m in _NIR.finditer(text):
        if nir_valid("".join(m.groups())):
            found.append(PatternMatch("NATIONAL_ID", m.group(), m.start(), m.end(), 0.95, True, "fr_nir"))
    return found


def find_context_ids(text: str, window: int) -> list[PatternMatch]:
    """ID-shaped tokens (two digits at least, 5 to 30 characters, not a date or a year) after a context
    word: passport, driver's licence or national ID numbers whose format we cannot check."""
    found = []
    for m in _ID_TOKEN.finditer(text):
        token = m.group()
        compact = re.sub(r"[ -]", "", token)
        if len(compact) < 5 or sum(c.isdigit() for c in compact) < 2 or _DATE_LIKE.match(token):
            continue
        kind = _context_type(text, m.start(), window)
        if kind is None or (kind == "NATIONAL_ID" and _SSN.fullmatch(token)):
            continue  # an SSN-shaped national ID is the SSN recognizer's to accept or refuse
        found.append(PatternMatch(kind, token, m.start(), m.end(), 0.8, False, f"context_{kind.lower()}"))
    return found


def find_ip_addresses(text: str) -> list[PatternMatch]:
    found = []
    for m in [*_IPV4.finditer(text), *_IPV6.finditer(text)]:
        try:
            ip = ipaddress.ip_address(m.group())
        except ValueError:
            continue
        if ip.version == 4 and _VERSION_BEFORE.search(text[max(0, m.start() - 12) : m.start()]):
            continue
        if ip.version == 4 and not _IP_CONTEXT.search(text[max(0, m.start() - 40) : m.start()]):
            continue  # a bare dotted quad is as often a version or a score as an address
        found.append(PatternMatch("IP_ADDRESS", m.group(), m.start(), m.end(), 1.0, True, f"ipv{ip.version}"))
    return found


def find_url_credentials(text: str) -> list[PatternMatch]:
    found = []
    for m in _URL_CREDENTIALS.finditer(text):
        end = m.end()
        while end > m.start() and text[end - 1] in _TRAILING:
            end -= 1
        found.append(PatternMatch("URL_CREDENTIALS", text[m.start() : end], m.start(), end, 1.0, True, "url_credentials"))
    return found


@dataclass
class PatternRecognizer:
    """Every enabled recognizer over one text; overlapping hits among them are resolved by `resolve`."""

    config: PatternConfig = field(default_factory=PatternConfig)

    def __call__(self, text: str) -> list[PatternMatch]:
        return find_pii(text, self.config)


def find_pii(text: str, config: PatternConfig | None = None) -> list[PatternMatch]:
    """All structured PII in `text` by the enabled recognizers, overlaps resolved, in text order."""
    config = config or PatternConfig()
    want = config.types
    hits: list[PatternMatch] = []
    if "EMAIL" in want:
        hits += find_emails(text)
    if "PHONE" in want:
        hits += find_phones(text, config.regions, config.context_window)
    if "CARD" in want:
        hits += find_cards(text)
    if "IBAN" in want:
        hits += find_ibans(text)
    if "NATIONAL_ID" in want:
        # country checks first: of equal spans ("BSN 123456782", also SSN-shaped) the first kept names the number
        hits += find_country_ids(text, config.context_window) + find_national_ids(text, config.context_window)
    if want & {"NATIONAL_ID", "PASSPORT", "DRIVER_LICENSE"}:
        hits += [h for h in find_context_ids(text, config.context_window) if h.type in want]
    if "IP_ADDRESS" in want:
        hits += find_ip_addresses(text)
    if "URL_CREDENTIALS" in want:
        hits += find_url_credentials(text)
    return resolve(hits)


def redact(text: str, entities: Iterable[dict[str, Any]], types: Iterable[str] | None = None) -> str:
    """`text` with every entity span (dicts with `type`, `start`, `end`; of `types` if given) replaced by
    `[TYPE]`. Overlapping spans are joined and take the type of the one that starts first.

    >>> redact("mail ann@x.org now", [{"type": "EMAIL", "start": 5, "end": 14}])
    'mail [EMAIL] now'
    """
    allowed = None if types is None else set(types)
    spans = sorted((int(e["start"]), int(e["end"]), str(e["type"])) for e in entities
                   if allowed is None or e["type"] in allowed)
    out, pos = [], 0
    for start, end, kind in spans:
        if start < pos:  # overlaps the previous replacement: extend it
            pos = max(pos, end)
            continue
        out += [text[pos:start], f"[{kind}]"]
        pos = end
    out.append(text[pos:])
    return "".join(out)
