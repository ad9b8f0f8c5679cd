"""National-ID recognizers of operators/pii_ids.py (checks by python-stdnum) against outside oracles:
commonly published example numbers, their checks worked by hand below, and each country's check rule
written here a second time from its specification for the property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.pii_ids import find_country_ids
from operators.pii_patterns import find_pii


def found(text: str) -> list[tuple[str, str, float]]:
    return [(m.recognizer, m.text, m.score) for m in find_country_ids(text)]


# ------------------------------------------------------------------------- oracles from the specifications
def luhn_oracle(number: str) -> bool:
    """Canada's SIN: Luhn over nine digits (Service Canada); 0 and 8 are not issued as first digits."""
    digits = [int(c) for c in number]
    total = sum(d if i % 2 == 0 else sum(divmod(2 * d, 10)) for i, d in enumerate(digits))
    return len(digits) == 9 and number[0] not in "08" and total % 10 == 0


def tfn_oracle(number: str) -> bool:
    """Australia's TFN (ATO): weights 1 4 3 7 5 8 6 9 10, sum divisible by 11."""
    return sum(w * int(d) for w, d in zip((1, 4, 3, 7, 5, 8, 6, 9, 10), number, strict=False)) % 11 == 0


def pps_oracle(digits: str, second: str = "") -> str:
    """Ireland's PPS check letter (Revenue): digits weighted 8..2, a second letter A/B/H weighted 9 by its
    position in the alphabet; the sum mod 23 indexes W, A, B, ..., V."""
    total = sum(w * int(d) for w, d in zip(range(8, 1, -1), digits, strict=True))
    total += 9 * (ord(second) - 64) if second else 0
    return "WABCDEFGHIJKLMNOPQRSTUV"[total % 23]


def ean13_oracle(body: str) -> str:
    """The AHV number's last digit (ZAS): the EAN-13 check, weights 1 and 3 from the left."""
    return str(-sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body)) % 10)


_CF_ODD = dict(zip("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                   [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6,
                    8, 12, 14, 16, 10, 22, 25, 24, 23], strict=True))


def cf_oracle(first15: str) -> str:
    """The codice fiscale's check letter (DM 23/12/1976): characters in odd places (1st, 3rd, ...) by the
    decree's table, in even places by their value (digits 0-9, A-Z 0-25); the sum mod 26 as a letter."""
    even = {c: ord(c) - ord("A") if c.isalpha() else int(c) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    total = sum(_CF_ODD[c] if i % 2 == 0 else even[c] for i, c in enumerate(first15))
    return chr(65 + total % 26)


def bsn_oracle(number: str) -> bool:
    """The Dutch BSN's 11-proof: 9*d1 + 8*d2 + ... + 2*d8 - d9 divisible by 11, not all zeros."""
    total = sum((9 - i) * int(d) for i, d in enumerate(number[:8])) - int(number[8])
    return total % 11 == 0 and int(number) > 0


# ------------------------------------------------------------------------------------ published examples
# Each check worked by hand:
# CA 130 692 544: Luhn 1 6 0 3 9 4 5 8 4 (every second digit doubled, 12 -> 3) = 40.
# AU 123 456 782: 1*1 + 2*4 + 3*3 + 4*7 + 5*5 + 6*8 + 7*6 + 8*9 + 2*10 = 253 = 11 * 23.
# IE 1234567T: 8+14+18+20+20+18+14 = 112, 112 mod 23 = 20 -> T; 1234567FA: 112 + 9*1 = 121, mod 23 = 6 -> F.
# CH 756.1234.5678.97: the sample AHV card's number; EAN weights 1,3 over 756123456789 sum to 123 -> 7.
# IT RSSMRA85T10A562S: the usual "Mario Rossi" example, born 10 (10) December (T) 1985 (85); odd places
#    R S R 8 T 0 5 2 -> 8+12+8+19+14+1+13+5 = 80, even places S M A 5 1 A 6 -> 18+12+0+5+1+0+6 = 42,
#    122 mod 26 = 18 -> S.
# NL 111222333: 9+8+7+12+10+8+9+6 - 3 = 66 = 11 * 6 (a test BSN often used in Dutch documentation).
EXAMPLES = [
    ("my SIN is 130 692 544", "ca_sin", "130 692 544"),
    ("Social Insurance Number: 130-692-544", "ca_sin", "130-692-544"),
    ("numéro d'assurance sociale 130692544", "ca_sin", "130692544"),
    ("TFN 123 456 782 for the new job", "au_tfn", "123 456 782"),
    ("my tax file number is 123456782", "au_tfn", "123456782"),
    ("PPS number 1234567T", "ie_pps", "1234567T"),
    ("PPSN: 1234567FA", "ie_pps", "1234567FA"),
    ("AHV-Nr. 756.1234.5678.97", "ch_ahv", "756.1234.5678.97"),
    ("numéro AVS 7561234567897", "ch_ahv", "7561234567897"),
    ("codice fiscale RSSMRA85T10A562S", "it_cf", "RSSMRA85T10A562S"),
    ("BSN 111222333", "nl_bsn", "111222333"),
    ("burgerservicenummer 1112.22.333", "nl_bsn", "1112.22.333"),
]


@pytest.mark.parametrize("text,recognizer,number", EXAMPLES)
def test_published_example_numbers_are_found_after_their_context_word(text, recognizer, number):
    assert found(text) == [(recognizer, number, 1.0)]
    (m,) = find_pii(text)
    assert (m.type, m.recognizer, m.validated, text[m.start : m.end]) == ("NATIONAL_ID", recognizer, True, number)


def test_hand_worked_examples_agree_with_the_oracles():
    assert luhn_oracle("130692544") and tfn_oracle("123456782") and bsn_oracle("111222333")
    assert pps_oracle("1234567") == "T" and pps_oracle("1234567", "A") == "F"
    assert ean13_oracle("756123456789") == "7" and cf_oracle("RSSMRA85T10A562") == "S"


@pytest.mark.parametrize("text", ["my SIN is 130 692 545", "TFN 123 456 783", "PPS number 1234567A",
                                  "AHV-Nr. 756.1234.5678.98", "codice fiscale RSSMRA85T10A562A", "BSN 111222334",
                                  "codice fiscale RSSMRA85T32A562S"])  # 32 is no day of any month
def test_a_number_failing_its_check_is_not_found(text):
    assert found(text) == []


def test_a_wrong_check_after_a_context_word_is_still_reported_but_not_validated():
    (m,) = find_pii("my SIN is 130 692 545")
    assert (m.type, m.validated, m.score) == ("NATIONAL_ID", False, 0.8)


def test_the_context_word_decides_which_country_a_number_is():
    """123 456 782 passes the SIN's Luhn, the TFN's weights and the BSN's 11-proof alike."""
    assert found("SIN 123 456 782") == [("ca_sin", "123 456 782", 1.0)]
    assert found("TFN 123 456 782") == [("au_tfn", "123 456 782", 1.0)]
    assert found("BSN 123456782") == [("nl_bsn", "123456782", 1.0)]
    assert [m.recognizer for m in find_pii("BSN 123456782")] == ["nl_bsn"]  # not the SSN-shaped rule


@pytest.mark.parametrize("text", ["order 130 692 544 shipped", "ticket 123456782", "1234567T is my locker",
                                  "barcode 7561234567897", "what a sin 130 692 544", "my nas 130692544",
                                  "bsn 111222333", "CF card 130692544"])
def test_without_the_countrys_context_word_no_number_is_found(text):
    """A check digit passes one random number in ten or so: digits alone are never enough, and short
    acronyms ("SIN", "NAS", "BSN") count only in capitals."""
    assert found(text) == []


def test_nas_the_sins_french_acronym_counts_for_the_sin_only():
    assert found("NAS 130692544") == [("ca_sin", "130692544", 1.0)]
    assert found("NAS 123456782") == [("ca_sin", "123456782", 1.0)]  # not a TFN or a BSN


def test_a_context_word_further_back_than_the_window_does_not_count():
    assert found("SIN" + " filler" * 10 + " 130 692 544") == []


def test_distinctive_forms_are_found_without_a_context_word_at_a_lower_score():
    assert found("Mario RSSMRA85T10A562S") == [("it_cf", "RSSMRA85T10A562S", 0.95)]
    assert found("meine 756.1234.5678.97 bitte") == [("ch_ahv", "756.1234.5678.97", 0.95)]
    assert found("meine 7561234567897 bitte") == []  # thirteen plain digits could be any barcode


@pytest.mark.parametrize("text", ["SIN 130692544123", "TFN A123456782", "BSN 111222333-4", "PPS 1234567TWX",
                                  "codice fiscale XRSSMRA85T10A562S"])
def test_a_number_inside_a_longer_token_is_not_found(text):
    assert found(text) == []


def test_a_validated_id_is_not_also_a_phone_number():
    assert [(m.type, m.recognizer) for m in find_pii("call me, my SIN is 130 692 544")] == [("NATIONAL_ID", "ca_sin")]


# ------------------------------------------------------------------------------------------ properties
digits = st.text(alphabet="0123456789", min_size=1, max_size=1)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=9, max_size=9), st.sampled_from([" ", "-", ""]))
def test_a_sin_is_found_exactly_when_luhn_holds(number, sep):
    written = sep.join((number[:3], number[3:6], number[6:]))
    assert bool(found(f"SIN {written}")) == luhn_oracle(number)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_a_tfn_is_found_exactly_when_its_weighted_sum_divides_by_11(number):
    assert bool(found(f"tax file number {number}")) == tfn_oracle(number)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_a_bsn_is_found_exactly_when_the_11_proof_holds(number):
    assert bool(found(f"BSN {number}")) == bsn_oracle(number)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=7, max_size=7), st.sampled_from(["", "A", "B", "H"]),
       st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVW"))
def test_a_pps_number_is_found_exactly_when_its_check_letter_is_right(body, second, letter):
    assert bool(found(f"PPS {body}{letter}{second}")) == (letter == pps_oracle(body, second))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=9, max_size=9), digits)
def test_an_ahv_number_is_found_exactly_when_its_ean_check_is_right(body, check):
    number = "756" + body + check
    dotted = f"{number[:3]}.{number[3:7]}.{number[7:11]}.{number[11:]}"
    assert bool(found(f"AHV {dotted}")) == (check == ean13_oracle("756" + body))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="BCDFGLMNPRSTVZ", min_size=6, max_size=6), st.integers(0, 99),
       st.sampled_from("ABCDEHLMPRST"), st.integers(1, 28), st.booleans(),
       st.sampled_from("ABCDEFGHILMZ"), st.integers(1, 999), st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
def test_a_codice_fiscale_is_found_exactly_when_its_check_letter_is_right(name, year, month, day, female, town,
                                                                           code, check):
    first15 = f"{name}{year:02d}{month}{day + 40 * female:02d}{town}{code:03d}"
    assert bool(found(f"codice fiscale {first15}{check}")) == (check == cf_oracle(first15))
