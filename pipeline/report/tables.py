"""CSV files people open in spreadsheets: written in one piece, with cells that a spreadsheet would run as a formula
(`=`, `+`, `-`, `@`, tab or carriage return first) prefixed by `'` (as OWASP advises), and read back the same way."""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> str:
    """A cell as text that a spreadsheet shows rather than evaluates (numbers are left as they are)."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _is_number(text):
        return "'" + text
    return text


def unsafe_cell(text: str) -> str:
    """The value `safe_cell` wrote."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_number(text: str) -> bool:
    """A plain decimal number such as -0.5 or 1e-3 (what a spreadsheet reads as a number, not a formula)."""
    return _NUMBER.fullmatch(text) is not None


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    return "".join(csv_chunks(header, [rows]))


def csv_chunks(header: Sequence[str], blocks: Iterable[Iterable[Sequence[object]]]) -> Iterator[str]:
    """`csv_text` of the rows of every block, as one text per block (the header first): for files too large to
    format whole."""
    for rows in itertools.chain([[header]], blocks):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([safe_cell(c) for c in row] for row in rows)
        yield buffer.getvalue()
