"""The one reader and writer of decimal strings and RFC 3339 timestamps (gpuyard.api.formats):
rounded and exact decimals, whole-second and exact times, and what each refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from gpuyard.api.common import DECIMAL_PLACES
from gpuyard.api.formats import (
    InvalidValueError,
    format_decimal,
    format_time,
    parse_decimal,
    parse_time,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0"), "0"),
        (Decimal("-0.0000001"), "0"),
        (Decimal("2.5000"), "2.5"),
        (Decimal("100"), "100"),
        (Decimal("1E+3"), "1000"),
        (Decimal("0.1234565"), "0.123456"),  # half-even: ties go to the even digit
        (Decimal("0.1234575"), "0.123458"),
        (Decimal("-3.25"), "-3.25"),
        (Decimal(1) / Decimal(3), "0.333333"),
    ],
)
def test_format_decimal_rounded_to_places(value: Decimal, text: str) -> None:
    assert format_decimal(value, places=DECIMAL_PLACES) == text


def test_format_time_in_whole_seconds_is_utc_metav1_time() -> None:
    moment = datetime(2024, 5, 1, 14, 30, 15, 999_999, tzinfo=timezone(timedelta(hours=2)))

    assert format_time(moment, whole_seconds=True) == "2024-05-01T12:30:15Z"
    assert (
        format_time(datetime(2024, 5, 1, tzinfo=UTC), whole_seconds=True) == "2024-05-01T00:00:00Z"
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        format_time(datetime(2024, 5, 1), whole_seconds=True)  # noqa: DTZ001 - the point of the test


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0E-9"), "0.000000000"),  # not "0E-9", which billing APIs reject
        (Decimal("2.500000000"), "2.500000000"),  # the meter's quantum shows
        (Decimal("0.0006944444444"), "0.0006944444444"),  # no second rounding
        (Decimal("1E+3"), "1000"),
        (Decimal("-3.25"), "-3.25"),
    ],
)
def test_format_decimal_exact_keeps_every_digit(value: Decimal, text: str) -> None:
    assert format_decimal(value) == text


@pytest.mark.parametrize("text", ["2.50", "007.50", "0", "12"])
def test_parse_decimal_round_trips_exactly(text: str) -> None:
    assert format_decimal(parse_decimal(text)) == str(Decimal(text))


@pytest.mark.parametrize("value", [1.5, True, None, "NaN", "Infinity", "-inf", "1,5", ""])
def test_parse_decimal_refuses_what_is_not_an_exact_finite_decimal(value: object) -> None:
    with pytest.raises(InvalidValueError, match="price"):
        parse_decimal(value, name="price")


def test_parse_time_refuses_naive_and_malformed_timestamps() -> None:
    with pytest.raises(InvalidValueError, match="timezone-aware"):
        parse_time("2024-05-01T12:00:00")
    with pytest.raises(InvalidValueError, match="RFC 3339"):
        parse_time("yesterday")


def test_format_time_exact_keeps_fractions_and_writes_utc() -> None:
    assert format_time(parse_time("2024-05-01T14:00:00+02:00")) == "2024-05-01T12:00:00Z"
    half = datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    assert format_time(half) == "2024-05-01T12:00:00.500000Z"
    assert parse_time(format_time(half)) == half
