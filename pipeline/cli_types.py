"""argparse types shared by the commands: each refuses a bad value with a message saying what is expected, before any
work starts (NaN and infinity included)."""

from __future__ import annotations

import argparse
import math


def int_at_least(minimum: int):
    """An argparse type for integers >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """An argparse type for finite numbers in [low, high] (open ends as asked): NaN and infinity are refused."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    span = f"{left}{low:g}, {high:g}{right}" if math.isfinite(high) else f">{'' if low_open else '='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, got {text!r}")
        return value

    return parse


def byte_size(text: str) -> int:
    """argparse type for sizes such as 1GiB or 500MB (0: no limit)."""
    from pipeline.index_plan import parse_memory_size

    if text.strip() == "0":
        return 0
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def batch_size(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


def max_pixels(text: str) -> int:
    return non_negative_int(text.replace(",", "").replace("_", ""))


def memory_size(text: str) -> int:
    """argparse type for `pipeline.index_plan.parse_memory_size`."""
    from pipeline.index_plan import parse_memory_size

    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def number_list(cast: type, example: str, *, positive: bool = True):
    def parse(text: str) -> tuple:
        message = (f"expected comma-separated {'positive ' if positive else ''}finite numbers such as {example}; "
                   f"got {text!r}")
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(message) from None
        if not values or any(not math.isfinite(v) for v in values) or (positive and any(v <= 0 for v in values)):
            raise argparse.ArgumentTypeError(message)
        return values

    return parse


def names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names
