"""One way to check an argument: a wrong type raises ``TypeError``, a value out of range
raises ``ValueError``, and both say ``"<name> must be <what is allowed>, got <value>"``.

>>> check_int("every_n_epochs", 2, minimum=1)
2
>>> check_int("every_n_epochs", "2", minimum=1)
Traceback (most recent call last):
...
TypeError: every_n_epochs must be an int >= 1, got '2' (str)
>>> check_float("lr", 0.0, low=0.0, low_open=True)
Traceback (most recent call last):
...
ValueError: lr must be a number > 0.0, got 0.0
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

__all__ = ["check_bool", "check_choice", "check_float", "check_int"]


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) \
        else repr(value)


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _meaning(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False, meaning: str = "") -> Any:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (``None`` passes if ``optional``).

    ``bool`` is refused although it is an ``int`` subclass: ``True`` as a count is a mistake.
    ``meaning`` is appended in parentheses to say what the number is for.
    """
    if value is None and optional:
        return None
    allowed = (f"an int{_int_range(minimum, maximum)}{' or None' if optional else ''}"
               f"{_meaning(meaning)}")
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be {allowed}, got {_got(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False,
                meaning: str = "") -> Any:
    """``value`` as a finite ``float`` within the given bounds (open or closed).

    ``meaning`` is appended in parentheses to say what the number is for.
    """
    if value is None and optional:
        return None
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low}"
    elif high is not None:
        bounds = f" {'<' if high_open else '<='} {high}"
    else:
        bounds = ""
    allowed = f"a number{bounds}{' or None' if optional else ''}{_meaning(meaning)}"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be {allowed}, got {_got(value)}")
    v = float(value)
    bad = (math.isnan(v) or math.isinf(v)
           or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (``"yes"``, ``1`` and ``None`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any], meaning: str = "") -> Any:
    """``value`` if it is one of ``choices``."""
    if value in choices:
        return value
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name} must be one of {allowed}{_meaning(meaning)}, got {value!r}")
