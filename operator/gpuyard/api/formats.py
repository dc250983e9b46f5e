"""How amounts and moments are written as text: decimal strings and RFC 3339 timestamps.

Specs, status, usage records and the ledger all carry amounts as decimal strings (never
floats, so a price survives every round trip exactly) and moments as RFC 3339 in UTC. The
readers and writers here are the only ones, so the meter, the status writers and the CLI
agree on every character.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation


class InvalidValueError(ValueError):
    """A decimal or a timestamp that cannot be read or written without guessing."""


# --- decimals ------------------------------------------------------------------------------

_QUANTITY_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: object) -> Decimal | None:
    """A Kubernetes quantity (`80Gi`, `2`, `1.5k`) as an exact decimal, or None when it does
    not parse. Milli quantities (`500m`) are not read: no GPU count or device capacity the
    operator reads is one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str) or not value:
        return None
    number, suffix = value, ""
    for candidate in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if candidate and value.endswith(candidate):
            number, suffix = value[: -len(candidate)], candidate
            break
    try:
        amount = Decimal(number) * _QUANTITY_SUFFIXES[suffix]
    except InvalidOperation:
        return None
    return amount if amount.is_finite() else None


def parse_decimal(text: object, *, name: str = "decimal") -> Decimal:
    """The exact value of a decimal string (or an int); floats are refused, since they are
    not exact, and so are NaN and the infinities. `name` says in the error what was read."""
    if isinstance(text, bool) or not isinstance(text, str | int | Decimal):
        raise InvalidValueError(f"{name} must be a decimal string, got {text!r}")
    try:
        value = Decimal(text)
    except InvalidOperation as error:
        raise InvalidValueError(f"{name} is not a decimal: {text!r}") from error
    if not value.is_finite():
        raise InvalidValueError(f"{name} must be finite, got {text!r}")
    return value


def format_decimal(value: Decimal, *, places: int | None = None) -> str:
    """`value` in fixed-point notation, never with an exponent (`str(Decimal("0E-9"))` is
    `0E-9`, which billing APIs reject).

    - `places=None` (usage records, marks, price history): every digit of `value` as it is,
      trailing zeros included. The meter has already rounded its amounts (to 1e-9, see
      `gpuyard.logic.metering`), so this writes them without rounding a second time.
    - `places=N`: rounded to N decimals, ties to even (ROUND_HALF_EVEN), then trailing zeros
      and a trailing point dropped, and `-0` written as `0`; so equal amounts always render
      as equal strings, whatever exponent arithmetic left on them.
    """
    if places is not None:
        value = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    text = format(value, "f")
    if places is not None and "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if places is not None and text in {"-0", ""} else text


# --- moments -------------------------------------------------------------------------------


def require_utc(moment: datetime, name: str = "time") -> datetime:
    """`moment` in UTC; a naive datetime is refused because it hides a time-zone bug."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        msg = (
            f"{name} must be timezone-aware (pass datetime.now(UTC), not datetime.now()), "
            f"got naive {moment!r}"
        )
        raise InvalidValueError(msg)
    return moment.astimezone(UTC)


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp as Kubernetes writes it (`2024-05-01T12:00:00Z`), in UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except (TypeError, ValueError) as error:
        raise InvalidValueError(f"not an RFC 3339 timestamp: {text!r}") from error
    return require_utc(parsed, f"timestamp {text!r}")


def format_time(moment: datetime, *, whole_seconds: bool = False) -> str:
    """`moment` as RFC 3339 in UTC with a `Z` suffix.

    - `whole_seconds=False` (the meter's records, marks and price history): fractional
      seconds are kept when present, so a price first seen at 12:00:00.5 still takes
      effect from the window starting at 12:00:01, after a restart as before it.
    - `whole_seconds=True` (condition times, lastScaleTime, recommendation time): the
      fraction is dropped, as Kubernetes writes metav1.Time.
    """
    utc = require_utc(moment)
    if whole_seconds:
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return utc.isoformat().replace("+00:00", "Z")
