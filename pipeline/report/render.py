"""Rendering report blocks: markdown (figures as PNG files beside it) and one self-contained HTML page.

Text in a block is a sequence of parts: plain strings are ours (trusted markup), `Value`s are theirs (paths, backbone
and class names, ids), always rendered as literal text: escaped for markdown (backslashes for markdown punctuation,
entities for `<`, `>`, `&`, `|`, `~`, which python-markdown and markdown-it both honour, so that a name can neither
become HTML nor break a table) and HTML-escaped in the page. Table cells are always values. Both files start with a
marker by which later runs recognise them as this tool's (see `pipeline.outputs`).
"""

from __future__ import annotations

import base64
import html
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.outputs import check_output, owned_marker, owned_text, sibling, write_atomic

MD_MARK = "<!-- featpipe report -->"
HTML_MARK = '<meta name="generator" content="featpipe">'
# How reports written before outputs were marked begin (still recognised, so older output folders keep working).
LEGACY_MD = ("# Evaluation of ", "# Demo: ", "# Leaderboard: ")
LEGACY_HTML = "<style>body{font-family:system-ui,sans-serif;max-width:1100px"
PLOTS_MARK = ".featpipe-plots"
# Markdown specials anywhere in a value, escaped with a backslash (both python-markdown and CommonMark honour these),
# and with an entity where python-markdown has no backslash escape. Parentheses need nothing: `]` is escaped, so no
# link can form. Block markers (`#`, `+`, `-`, `=`, `1.`) matter only at the start of a value.
_MD_BACKSLASH = set("\\`*_[]")
_MD_ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "~": "&#126;"}
_MD_LEADING = re.compile(r"^([#+\-=]|\d+[.)])")


class Value(str):
    """A user-controlled string in a report: rendered as literal text, never as markup."""


Text = str | tuple[str, ...]  # parts: plain strings are markup, Values are literal


def md_text(value: str) -> str:
    """`value` as literal markdown text (one line)."""
    text = str(value)
    lead = _MD_LEADING.match(text)
    if lead:  # "- x", "# x", "1. x" would start a list or heading: escape the marker's last character
        cut = lead.end() - 1
        return md_text(text[:cut]) + "\\" + text[cut] + md_text(text[cut + 1:]) if cut else "\\" + text[0] + \
            md_text(text[1:])
    out = []
    for i, ch in enumerate(text):
        if ch in _MD_ENTITY:
            out.append(_MD_ENTITY[ch])
        elif ch == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
            out.append(ch)  # inside a word `_` never starts emphasis (CommonMark and python-markdown alike)
        elif ch in _MD_BACKSLASH:
            out.append("\\" + ch)
        elif ch in "\r\n\t":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _parts(text: Text) -> tuple[str, ...]:
    return (text,) if isinstance(text, str) else text


def md_inline(text: Text) -> str:
    return "".join(md_text(p) if isinstance(p, Value) else p for p in _parts(text))


def html_inline(text: Text) -> str:
    return "".join(f"<code>{html.escape(p)}</code>" if isinstance(p, Value) else html.escape(p)
                   for p in _parts(text))


def plain(text: Text) -> str:
    return "".join(_parts(text))


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]], *, align: str = "") -> str:
    """A markdown table whose every cell is literal text. `align`: one of l/r per column (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    out = ["| " + " | ".join(md_text(h) for h in header) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(md_text(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


@dataclass
class Block:
    kind: str  # h1 | h2 | p | table | figure
    text: Text = ""
    header: tuple[str, ...] = ()
    rows: list[tuple[str, ...]] | None = None
    png: bytes = b""
    name: str = ""
    extra: dict = field(default_factory=dict)


def render_markdown(blocks: list[Block], plots_dir: Path) -> tuple[str, dict[Path, bytes]]:
    """The markdown text, and the figure files it links to (relative to the markdown file's folder)."""
    out, files = [MD_MARK, ""], {}
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out += [f"{'#' if b.kind == 'h1' else '##'} {md_inline(b.text)}", ""]
        elif b.kind == "p":
            out += [md_inline(b.text), ""]
        elif b.kind == "table":
            out += ["", markdown_table(b.header, b.rows or []), ""]
        elif b.kind == "figure":
            png = plots_dir / f"{b.name}.png"
            files[png] = b.png
            link = urllib.parse.quote(f"{plots_dir.name}/{png.name}")
            out += ["", f"![{md_inline(b.text)}]({link})", "", f"*{md_inline(b.text)}*", ""]
    return "\n".join(out) + "\n", files


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "td:not(:first-child){text-align:right}th{background:#f3f3f3}img{max-width:100%}"
        "figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 3px}")


def render_html(blocks: list[Block]) -> str:
    title = next((plain(b.text) for b in blocks if b.kind == "h1"), "report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', HTML_MARK,
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{html_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts = _parts(b.text)
            first = parts[0].removeprefix("- ") if parts and not isinstance(parts[0], Value) else parts[0]
            out.append(f"<p>{html_inline((first, *parts[1:]))}</p>")
        elif b.kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows or []]
            out.append("</table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode()
            out.append(f'<figure><img alt="{html.escape(plain(b.text))}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html_inline(b.text)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def report_paths(stem: Path) -> tuple[Path, Path, Path]:
    """STEM.md, STEM.html and the STEM.plots/ folder."""
    return sibling(stem, ".md"), sibling(stem, ".html"), sibling(stem, ".plots")


def check_report_outputs(stem: str | Path, *, overwrite: bool = False, protect: tuple = ()) -> None:
    """Before any compute: the report's files may be (re)written (see `pipeline.outputs.check_output`)."""
    md, page, plots = report_paths(Path(stem))
    check_output(md, owned=owned_text(MD_MARK, *LEGACY_MD), overwrite=overwrite, protect=protect, what="the report")
    check_output(page, owned=owned_marker(HTML_MARK, LEGACY_HTML), overwrite=overwrite, protect=protect,
                 what="the report")
    if plots.exists() or plots.is_symlink():
        ours = plots.is_dir() and not plots.is_symlink() and ((plots / PLOTS_MARK).is_file() or
                                                              all(p.suffix == ".png" for p in plots.iterdir()))
        if not ours and not (overwrite and plots.is_dir()):
            raise PipelineError(f"{plots} exists and is not a figure folder written by this tool; choose another "
                                "--out, or remove it")


def write_report_blocks(stem: str | Path, blocks: list[Block]) -> tuple[Path, Path]:
    """Write STEM.md (figures in STEM.plots/) and the self-contained STEM.html; return both paths."""
    md, page, plots = report_paths(Path(stem))
    text, files = render_markdown(blocks, plots)
    if files:
        plots.mkdir(parents=True, exist_ok=True)
        write_atomic(plots / PLOTS_MARK, "figures of a featpipe report\n")
        for path, data in files.items():
            write_atomic(path, data)
    write_atomic(md, text)
    write_atomic(page, render_html(blocks))
    return md, page
