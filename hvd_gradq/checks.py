"""Input checks at the API boundary, one wording for all: each raises ``ValueError`` naming the
argument, what it must be, and what it got."""
from __future__ import annotations

import math
from collections.abc import Collection


def integer(value, name: str, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """An int (not a bool) in [low, high]; ``hint`` follows the requirement in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) \
            or (high is not None and value > high):
        if low is not None and high is not None:
            what = f"an integer in {low}..{high}"
        elif low is not None:
            what = f"an integer >= {low}"
        else:
            what = "an integer"
        raise ValueError(f"{name} must be {what}{hint}, got {value!r}")
    return value


def number(value, name: str, *, low: float | None = None, high: float | None = None, above: float | None = None,
           positive: bool = False, finite: bool = True, hint: str = "") -> float:
    """A real number (not a bool): finite unless told, > 0 if ``positive``, > ``above``, in
    [``low``, ``high``] where given. ``hint`` follows the requirement in the message."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value) \
        and not (finite and math.isinf(value))
    if positive:
        above = 0.0 if above is None else max(above, 0.0)
    if ok and ((above is not None and not value > above) or (low is not None and not value >= low)
               or (high is not None and not value <= high)):
        ok = False
    if not ok:
        what = "a finite number" if finite else "a number"
        if low is not None and high is not None:
            what += f" in [{low:g}, {high:g}]"
        elif above is not None:
            what += f" > {above:g}"
        elif low is not None:
            what += f" >= {low:g}"
        raise ValueError(f"{name} must be {what}{hint}, got {value!r}")
    return float(value)


def choice(value, name: str, options: Collection) -> object:
    """One of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def flag(value, name: str) -> bool:
    """True or False (not 0/1)."""
    if value is not True and value is not False:
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def rotation_block(value, name: str) -> int:
    """0 (no rotation) or a power of two in 8..65536 (the largest rotation block)."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
            value == 0 or (8 <= value <= 1 << 16 and value & (value - 1) == 0)):
        raise ValueError(f"{name} must be 0 (no rotation) or a power of two in 8..65536, e.g. 4096, got {value!r}")
    return value
