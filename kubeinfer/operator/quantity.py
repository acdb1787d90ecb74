"""Kubernetes resource quantities ("500m", "32Gi", "1e3"): parse and compare, without the client.

The API server canonicalises quantities ("0.5" comes back as "500m"), so drift detection compares
values, not spellings.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

QUANTITY_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
_SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
           "P": Decimal("1e15"), "E": Decimal("1e18"),
           "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
           "Pi": Decimal(2**50), "Ei": Decimal(2**60)}


def is_quantity(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return isinstance(value, str) and bool(QUANTITY_RE.match(value))


def parse_quantity(value: str | int | float) -> Decimal:
    """'500m' -> Decimal('0.5'), '2Gi' -> Decimal(2147483648); ValueError when it is not one."""
    if isinstance(value, bool) or not is_quantity(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 4, 500m, 32Gi)")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    m = QUANTITY_RE.match(value)
    assert m is not None
    number, suffix = value[: m.start(3)] if m.group(3) else value, m.group(3) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
        return Decimal(number) * _SUFFIX[suffix]
    except (InvalidOperation, KeyError):
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None


def same_quantity(a: object, b: object) -> bool:
    """True when both are quantities of equal value ("1" and 1, "0.5" and "500m")."""
    if not (is_quantity(a) and is_quantity(b)):
        return False
    return parse_quantity(a) == parse_quantity(b)  # type: ignore[arg-type]
