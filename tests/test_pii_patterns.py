"""PII recognizers against outside oracles: libphonenumber's own example numbers and validity, Luhn and
mod-97 computed here a second way, the public test card numbers and example IBANs, Python's
`ipaddress`, and numbers that only look like PII (dates, prices, versions, order numbers)."""

from __future__ import annotations

import ipaddress
import random

import phonenumbers
import pytest

from operators.pii_patterns import (
    PATTERN_TYPES,
    PatternConfig,
    PatternMatch,
    find_pii,
    redact,
    resolve,
)

ALL_REGIONS = PatternConfig(regions=("US", "GB", "DE", "FR", "ES"))


def spans(text: str, config: PatternConfig | None = None) -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in find_pii(text, config)]


def luhn_oracle(number: str) -> bool:
    """Luhn the textbook way: double every second digit from the right, add the digits of the products."""
    digits = [int(c) for c in number][::-1]
    return sum(d if i % 2 == 0 else sum(divmod(2 * d, 10)) for i, d in enumerate(digits)) % 10 == 0


def mod97_oracle(iban: str) -> int:
    """ISO 7064 mod 97-10 computed piecewise (9 digits at a time), as the ECBS guide describes it."""
    s = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    remainder = 0
    for i in range(0, len(s), 7):
        remainder = int(str(remainder) + s[i : i + 7]) % 97
    return remainder


# ---------------------------------------------------------------------------------------------- email
@pytest.mark.parametrize("email", ["ann@example.org", "j.doe+news@mail.co.uk", "o_brien-77@uni-bonn.de"])
def test_email_addresses_are_found_with_exact_offsets(email):
    text = f"write to {email}, thanks"
    (m,) = find_pii(text)
    assert (m.type, m.text, m.start, m.validated) == ("EMAIL", email, 9, True)


@pytest.mark.parametrize("text", ["john dot doe at gmail dot com", "john[at]gmail[dot]com", "ann (at) web (dot) de"])
def test_spelled_out_emails_are_found_but_not_validated(text):
    (m,) = find_pii(f"reach me: {text} ok")
    assert (m.type, m.text, m.validated) == ("EMAIL", text, False)


@pytest.mark.parametrize("text", ["@AmazonHelp what is going on", "a..b@example.com", "meet at 5 @ the cafe"])
def test_handles_and_malformed_addresses_are_not_emails(text):
    assert [t for t, _ in spans(text)] == []


# ---------------------------------------------------------------------------------------------- phone
@pytest.mark.parametrize("region", ["US", "GB", "DE", "FR", "ES"])
@pytest.mark.parametrize("fmt", [phonenumbers.PhoneNumberFormat.NATIONAL, phonenumbers.PhoneNumberFormat.INTERNATIONAL])
def test_libphonenumber_example_numbers_are_found_in_national_and_international_form(region, fmt):
    number = phonenumbers.format_number(phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE), fmt)
    text = f"call me on {number} tonight"
    (m,) = find_pii(text, ALL_REGIONS)
    assert (m.type, m.text, m.start) == ("PHONE", number, text.index(number))


def test_national_numbers_follow_the_default_region():
    gb = phonenumbers.format_number(phonenumbers.example_number_for_type("GB", phonenumbers.PhoneNumberType.MOBILE),
                                    phonenumbers.PhoneNumberFormat.NATIONAL)
    text = f"text me {gb}"
    assert spans(text, PatternConfig(regions=("GB",))) == [("PHONE", gb)]
    assert spans(text, PatternConfig(regions=("US",))) == []


def test_a_phone_is_found_exactly_when_libphonenumber_calls_it_valid():
    rng = random.Random(5)
    for _ in range(300):
        digits = "".join(rng.choice("0123456789") for _ in range(10))
        text = f"my number is {digits[:3]}-{digits[3:6]}-{digits[6:]}"
        valid = phonenumbers.is_valid_number(phonenumbers.parse(digits, "US"))
        assert bool(spans(text)) == valid, text


# ----------------------------------------------------------------------------------------------- card
@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111",
                                  "5555 5555 5555 4444", "3782 822463 10005", "6011 1111 1111 1117",
                                  "3530 1113 3330 0000", "2223 0031 2200 3222"])
def test_public_test_card_numbers_are_found(card):
    text = f"card {card} exp 12/27 cvv 123"
    assert spans(text) == [("CARD", card)]


def test_a_card_is_found_exactly_when_luhn_and_a_network_prefix_hold():
    rng = random.Random(11)
    for _ in range(500):
        prefix = rng.choice(["4", "51", "37"])
        number = prefix + "".join(rng.choice("0123456789") for _ in range((15 if prefix == "37" else 16) - len(prefix)))
        grouped = f"{number[:4]} {number[4:10]} {number[10:]}" if prefix == "37" else \
            " ".join(number[i : i + 4] for i in range(0, 16, 4))
        text = f"pay with {grouped} pls"
        assert ("CARD" in [t for t, _ in spans(text)]) == luhn_oracle(number), number


@pytest.mark.parametrize("text", ["1234 5678 9012 3456", "order 4111 1111 1111 1112", "9999 9999 9999 9995"])
def test_card_shaped_numbers_failing_luhn_or_prefix_are_not_cards(text):
    assert "CARD" not in [t for t, _ in spans(text)]


# ----------------------------------------------------------------------------------------------- iban
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "FR14 2004 1010 0505 0001 3M02 606",
         "NL91 ABNA 0417 1643 00", "ES91 2100 0418 4502 0005 1332", "CH93 0076 2011 6238 5295 7",
         "BE68539007547034", "IT60X0542811101000000123456"]


@pytest.mark.parametrize("iban", IBANS)
def test_example_ibans_are_found_and_pass_the_independent_mod97(iban):
    assert mod97_oracle(iban.replace(" ", "")) == 1
    text = f"IBAN: {iban} and thanks again"
    assert spans(text) == [("IBAN", iban)]


@pytest.mark.parametrize("iban", IBANS)
def test_one_changed_digit_breaks_an_iban(iban):
    i = max(i for i, c in enumerate(iban) if c.isdigit())
    broken = iban[:i] + str((int(iban[i]) + 1) % 10) + iban[i + 1 :]
    assert mod97_oracle(broken.replace(" ", "")) != 1
    assert "IBAN" not in [t for t, _ in spans(f"IBAN {broken}")]


def test_lowercase_iban_is_found_and_a_following_word_never_joins_it():
    assert spans("send it to de89370400440532013000 asap") == [("IBAN", "de89370400440532013000")]


# ------------------------------------------------------------------------------------- national IDs
def test_ssn_with_separators_is_found_and_invalid_ranges_are_not():
    assert spans("my SSN is 123-45-6789") == [("NATIONAL_ID", "123-45-6789")]
    for bad in ["000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "123-45-0000"]:
        assert spans(f"ssn {bad}") == [], bad


def test_nine_plain_digits_are_an_ssn_only_after_a_context_word():
    assert spans("social security number 123456789") == [("NATIONAL_ID", "123456789")]
    assert spans("tracking 123456789 arrives monday") == []


@pytest.mark.parametrize("ni", ["QQ 12 34 56 C", "AB123456C", "ab 12 34 56 d"])
def test_uk_ni_numbers_are_found(ni):
    assert spans(f"NI number {ni}") == [("NATIONAL_ID", ni)]


@pytest.mark.parametrize("ni", ["GB123456C", "BG123456A", "DA123456C", "AO123456C", "AB123456E"])
def test_ni_numbers_with_prefixes_or_suffixes_hmrc_never_issues_are_not_found(ni):
    assert spans(f"here {ni} there") == []


def test_spanish_dni_and_nie_need_the_right_check_letter():
    table = "TRWAGMYFPDXBNJZSQVHLCKE"  # published by the Spanish interior ministry
    assert spans("DNI 12345678Z") == [("NATIONAL_ID", "12345678Z")]
    assert spans(f"NIE X1234567{table[1234567 % 23]}") == [("NATIONAL_ID", f"X1234567{table[1234567 % 23]}")]
    assert [t for t, _ in spans("ref 12345678A")] == []


def test_french_nir_needs_its_key():
    body = "2840575123456"
    key = 97 - int(body) % 97
    assert spans(f"numéro de sécu 2 84 05 75 123 456 {key:02d}") == [("NATIONAL_ID", f"2 84 05 75 123 456 {key:02d}")]
    assert "NATIONAL_ID" not in [t for t, _ in spans(f"ref 2 84 05 75 123 456 {(key + 1) % 97:02d}")]


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("my passport number is 533380006, expires 2027", "PASSPORT", "533380006"),
    ("Reisepass C01X00T47 verloren", "PASSPORT", "C01X00T47"),
    ("driving licence MORGA753116SM9IJ", "DRIVER_LICENSE", "MORGA753116SM9IJ"),
    ("CA driver's license: D1234567", "DRIVER_LICENSE", "D1234567"),
    ("DL# 123 456 789", "DRIVER_LICENSE", "123 456 789"),
    ("Personalausweis L01X00T47", "NATIONAL_ID", "L01X00T47"),
])
def test_id_numbers_without_a_checksum_are_found_after_their_context_word(text, kind, value):
    assert spans(text) == [(kind, value)]


@pytest.mark.parametrize("text", ["the code is C01X00T47", "ich war nie 10115 mal dort", "dl 533380006 files",
                                  "passport photos cost 12.50 at 14:30 on 2027-03-01"])
def test_id_shaped_tokens_without_context_or_dates_are_not_found(text):
    assert spans(text) == []


# ------------------------------------------------------------------------------------- IP, URLs
def test_ipv4_after_a_network_word_is_found_exactly_when_ipaddress_accepts_it():
    rng = random.Random(2)
    for _ in range(300):
        quad = ".".join(str(rng.randint(0, 300)) for _ in range(4))
        try:
            ipaddress.ip_address(quad)
            valid = True
        except ValueError:
            valid = False
        assert (spans(f"the server ip is {quad}") == [("IP_ADDRESS", quad)]) == valid, quad


def test_versions_and_bare_dotted_numbers_are_not_ip_addresses():
    assert spans("updated to v1.2.3.4 then version 2.4.1.0, scores 1.2.3.4") == []


def test_ipv6_is_found():
    assert spans("ping 2001:db8::8a2e:370:7334 now") == [("IP_ADDRESS", "2001:db8::8a2e:370:7334")]


def test_url_with_credentials_is_one_span_and_not_an_email():
    text = "use postgres://admin:hunter2@db.example.com:5432/app."
    assert spans(text) == [("URL_CREDENTIALS", "postgres://admin:hunter2@db.example.com:5432/app")]


# --------------------------------------------------------------------------------------- clean text
@pytest.mark.parametrize("text", [
    "Order #112-4829371-5503826 still hasn't shipped, ordered on 03/14/2024",
    "iOS 17.4.1 broke my battery, 2023-11-05 was fine",
    "Final score 3-1, attendance 62,345, tickets $129.99",
    "Flight BA 287 leaves 10:45, gate B12, seat 23C",
    "Python 3.11.4 vs 3.12.0: 14% faster on 1,000,000 rows",
    "Tracking 1Z999AA10123456784 says delivered",
    "ISBN 978-3-16-148410-0 is on page 1234",
    "the 2024 budget is 1500000 EUR, up 12.5%",
])
def test_numbers_that_only_look_like_pii_are_not_found(text):
    assert spans(text, ALL_REGIONS) == []


# --------------------------------------------------------------------------------- config, resolve
def test_only_enabled_types_are_searched():
    text = "card 4111 1111 1111 1111 mail ann@example.org"
    assert spans(text, PatternConfig(types=frozenset({"EMAIL"}))) == [("EMAIL", "ann@example.org")]


@pytest.mark.parametrize("raw", [{"types": ["CARD", "SHOE_SIZE"]}, {"regions": ["XX"]}, {"colour": "red"}])
def test_bad_pattern_settings_are_refused(raw):
    with pytest.raises(ValueError):
        PatternConfig.from_dict(raw)


def test_pattern_config_reads_region_and_types():
    config = PatternConfig.from_dict({"region": "gb", "types": ["PHONE"]})
    assert config.regions == ("GB",) and config.types == frozenset({"PHONE"})
    assert PatternConfig.from_dict(None).types == frozenset(PATTERN_TYPES)


def test_resolve_prefers_validated_then_score_then_length():
    def m(start, end, score, validated):
        return PatternMatch("X", "", start, end, score, validated, "t")
    assert resolve([m(0, 5, 0.99, False), m(3, 9, 0.5, True)]) == [m(3, 9, 0.5, True)]
    assert resolve([m(0, 5, 0.9, True), m(3, 9, 0.95, True)]) == [m(3, 9, 0.95, True)]
    assert resolve([m(0, 5, 0.9, True), m(3, 12, 0.9, True)]) == [m(3, 12, 0.9, True)]
    assert resolve([m(0, 5, 0.9, True), m(5, 9, 0.9, True)]) == [m(0, 5, 0.9, True), m(5, 9, 0.9, True)]


def test_every_match_is_a_span_of_the_original_text():
    text = "Zoë: 4111 1111 1111 1111 / DE89 3704 0044 0532 0130 00 / +44 20 7946 0958 / QQ 12 34 56 C 🎉"
    found = find_pii(text, ALL_REGIONS)
    assert [m.type for m in found] == ["CARD", "IBAN", "PHONE", "NATIONAL_ID"]
    assert all(text[m.start : m.end] == m.text for m in found)


# ------------------------------------------------------------------------------------------- redact
def test_redact_replaces_spans_by_their_type_and_keeps_the_rest():
    text = "mail ann@example.org or call 415-555-0187"
    entities = [{"type": "EMAIL", "start": 5, "end": 20}, {"type": "PHONE", "start": 29, "end": 41}]
    assert redact(text, entities) == "mail [EMAIL] or call [PHONE]"
    assert redact(text, entities, types=["PHONE"]) == "mail ann@example.org or call [PHONE]"
    assert redact(text, []) == text


def test_redact_joins_overlapping_spans():
    assert redact("abcdefgh", [{"type": "A", "start": 1, "end": 4}, {"type": "B", "start": 3, "end": 6}]) == "a[A]gh"


# ------------------------------------------------------------------------------- phone context rules
def test_a_national_number_of_another_region_is_found_by_its_trunk_zero_or_a_phone_word():
    assert spans("the office 020 7946 0123 is closed", ALL_REGIONS) == [("PHONE", "020 7946 0123")]
    assert spans("llámame al 612 34 56 78", ALL_REGIONS) == [("PHONE", "612 34 56 78")]
    assert spans("we sold 612 34 56 78 units", ALL_REGIONS) == []


def test_a_number_after_an_id_or_order_word_is_not_a_phone():
    assert "PHONE" not in [t for t, _ in spans("Steuer-ID 12 345 678 903 im Brief", ALL_REGIONS)]
    assert spans("routing 026009593 for the wire", ALL_REGIONS) == []


def test_a_number_libphonenumber_cannot_place_counts_only_right_after_a_phone_word():
    assert not phonenumbers.is_valid_number(phonenumbers.parse("555.867.5309", "US"))
    (m,) = find_pii("text 555.867.5309 this weekend")
    assert (m.type, m.text, m.validated) == ("PHONE", "555.867.5309", False)
    assert spans("model 555.867.5309 in stock") == []
