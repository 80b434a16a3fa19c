"""Reports render: markdown with PNG files, self-contained HTML whose embedded images decode, non-trivial plots."""

from __future__ import annotations

import base64
import io
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pipeline.config import KnnConfig, ProbeConfig
from pipeline.engine.runner import extract_to_store
from pipeline.evaluation.knn import run_knn
from pipeline.evaluation.probes import run_probe
from pipeline.plan import ExtractConfig
from pipeline.report.blocks import write_report
from pipeline.store.read import load_store


def informative(data: bytes) -> bool:
    """A PNG that decodes, is not tiny and is not one flat colour."""
    image = Image.open(io.BytesIO(data))
    image.load()
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    return image.format == "PNG" and min(image.size) > 100 and gray.std() > 10


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag in ("link", "script") and (attrs.get("href") or attrs.get("src")):
            self.external.append(tag)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, small_digits_root, lite0):
    out = tmp_path_factory.mktemp("report") / "small.h5"
    extract_to_store(ExtractConfig.of(data=small_digits_root, out=out, workers=0, progress=False), backbone=lite0)
    return out


def test_probe_and_knn_reports_render_with_plots(small_store, tmp_path):
    probe, _ = run_probe(ProbeConfig(store=small_store, out=tmp_path / "p.probe.json", grid=(1.0,)))
    knn, _ = run_knn(KnnConfig(store=small_store, out=tmp_path / "p.knn.json", ks=(1, 5)))
    md, page = write_report(tmp_path / "both", fs=load_store(small_store), probe=probe, knn=knn, title="Both")

    plots = sorted((tmp_path / "both.plots").glob("*.png"))
    assert {p.stem for p in plots} == {"probe_confusion", "probe_per_class", "knn_confusion", "neighbours",
                                       "projection"}
    for png in plots:
        assert informative(png.read_bytes()), png
    text = md.read_text()
    for png in plots:
        assert f"(both.plots/{png.name})" in text
    assert "| linear" not in text and "logreg probe (C=1)" in text and "recall@k %" in text

    parser = _Images()
    parser.feed(page.read_text())
    assert len(parser.sources) == len(plots) and not parser.external  # self-contained
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        assert informative(base64.b64decode(src.split(",", 1)[1]))
    # the probe's own run wrote its report too
    assert (tmp_path / "p.probe.html").is_file() and (tmp_path / "p.knn.md").is_file()


def test_neighbour_grid_shows_the_real_images(small_store, tmp_path):
    """The grid's query cell holds the query's own pixels (digits are 8x8, enlarged without smoothing)."""
    from pipeline.engine.embed import images_for_ids

    fs = load_store(small_store)
    some = [str(i) for i in fs.ids[:3]]
    images = images_for_ids(fs.made, some)
    assert set(images) == set(some)
    root = fs.attrs["data"]
    original = Image.open(f"{root}/{some[0]}").convert("RGB")
    shown = images[some[0]]
    assert shown.size[0] % 8 == 0
    small = shown.resize(original.size, Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(small), np.asarray(original))


def test_report_still_renders_when_the_images_are_gone(small_digits_root, lite0, tmp_path):
    root = shutil.copytree(small_digits_root, tmp_path / "moved")
    store = tmp_path / "s.h5"
    extract_to_store(ExtractConfig.of(data=root, out=store, workers=0, progress=False), backbone=lite0)
    shutil.rmtree(root)
    knn, _ = run_knn(KnnConfig(store=store, out=tmp_path / "s.knn.json", ks=(1,)))
    text = (tmp_path / "s.knn.md").read_text()
    assert "the images could not be found" in text
    assert informative((tmp_path / "s.knn.plots" / "neighbours.png").read_bytes())
    assert knn["by_k"]["1"]["majority"]["top1"] == pytest.approx(31 / 50, abs=0.021)  # measured: 31 of 50 right


def test_markdown_tables_keep_every_cell_literal_under_a_real_renderer():
    """render.markdown_table / md_inline: user text such as names with markup stays text in python-markdown."""
    import markdown

    from pipeline.report.render import Value, markdown_table, md_inline

    names = ["*bold*", "<b>x</b>", "a|b", "- item", "1. first", "[l](http://x)", "snake_case_name", "`code`"]
    html = markdown.markdown(markdown_table(("name", "n"), [(n, "1") for n in names]), extensions=["tables"])
    assert html.count("<tr>") == len(names) + 1  # the header and one row per name: no cell split a row
    for tag in ("<em>", "<strong>", "<b>", "<a ", "<li>", "<code>"):
        assert tag not in html, tag
    cells = re.findall(r"<td>(.*?)</td>", html)  # the name column (the number column has a style)
    unescaped = [c.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&#124;", "|")
                 for c in cells]
    assert unescaped == names
    assert "<em>" in markdown.markdown(md_inline(("*ours* ", Value("*theirs*")))).split("theirs")[0]


def test_plots_decode_and_take_class_names_as_plain_text():
    """plots: a confusion matrix and per-class bars are real PNGs; a `$` name that is not valid TeX still draws."""
    from pipeline.report.plots import confusion_png, per_class_png

    names = ["cat", "$\\frac{$", "dog_1"]
    png = confusion_png([[5, 1, 0], [2, 3, 1], [0, 0, 6]], names, title="confusion of $x")
    assert informative(png)
    assert informative(per_class_png(dict(zip(names, (0.8, 0.5, 1.0), strict=True)), title="per class"))
