"""argparse types shared by the commands: each refuses a bad value with a message saying what is expected, before any
work starts (NaN and infinity included)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def bounded_int(minimum: int, maximum: int | None = None):
    """An argparse type for integers >= `minimum` (and <= `maximum` when given)."""
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def auto_or(parse):
    """An argparse type for `auto` (None) or a value `parse` accepts."""

    def parse_or_auto(text: str):
        return None if text == "auto" else parse(text)

    return parse_or_auto


def int_at_least(minimum: int):
    """An argparse type for integers >= `minimum`."""
    return bounded_int(minimum)


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


def byte_size(text: str) -> int | None:
    """argparse type for sizes such as 1GiB or 500MB (0: no limit, None)."""
    if text.strip() == "0":
        return None
    return memory_size(text)


def batch_size(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


def max_pixels(text: str) -> int | None:
    """A pixel count, with , or _ as digit separators (0: no limit, None)."""
    return non_negative_int(text.replace(",", "").replace("_", "")) or None


def memory_size(text: str) -> int:
    """argparse type for `pipeline.index.plan.parse_memory_size`."""
    from pipeline.index.plan import parse_memory_size

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


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def alpha(text: str) -> str:
    """`--alpha`: drop, white, black or R,G,B (see `pipeline.config.parse_alpha`)."""
    from pipeline.config import parse_alpha

    try:
        return parse_alpha(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def channel_triple(text: str) -> tuple[float, float, float]:
    """`--mean`/`--std`: three finite numbers, comma-separated (one per RGB channel)."""
    values = number_list(float, "0.485,0.456,0.406", positive=False)(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}")
    return values


# The parsers a spec field names with `parse=` (see `pipeline.plan.option`).
PARSERS = {
    "path": Path, "int": integer, "positive_int": positive_int, "non_negative_int": non_negative_int,
    "open_unit": finite_float(0, 1, low_open=True, high_open=True), "positive_float": finite_float(0, low_open=True),
    "non_negative_float": finite_float(0), "max_pixels": max_pixels, "byte_size": byte_size,
    "batch_size": batch_size, "alpha": alpha, "channel_triple": channel_triple,
    "unit": finite_float(0, 1, low_open=True),
}
