"""Real Prefect flow runs (ephemeral, under one test harness) and the library/orchestration boundary."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


ENTRY_POINT = ROOT / "pipeline" / "__main__.py"  # the application: it adds the flows' commands to the library's
DYNAMIC = {"pipeline/engine/decode.py": "the user's --image-plugin modules",  # import_module of a variable
           "pipeline/backbones/catalog.py": "the loaders named in FAMILIES (checked below)"}


def _imports(path: Path) -> list[str]:
    """Every module a file imports: statically, and through importlib.import_module (literal or f-string prefix)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module":
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                names.append(arg.value)
            elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                names.append(arg.values[0].value)
            else:
                rel = path.relative_to(ROOT).as_posix()
                assert rel in DYNAMIC, f"{rel} imports a module by a name the layering test cannot see"
    return names


def test_pipeline_never_imports_prefect_or_flows():
    offenders = [f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / "pipeline").rglob("*.py") if p != ENTRY_POINT
                 for n in _imports(p) if n.split(".")[0] in ("prefect", "flows")]
    assert offenders == []
    from pipeline.backbones.catalog import FAMILIES

    assert FAMILIES and all(f.loader.startswith("pipeline.backbones.") for f in FAMILIES)
    assert [n for n in _imports(ENTRY_POINT) if n.split(".")[0] == "flows"] == ["flows.commands"]
    code = ("import sys, pipeline.cli, pipeline.engine.runner, pipeline.evaluation.probes, pipeline.index.build, "
            "pipeline.report.blocks, pipeline.demo, pipeline.cli.evaluate, flows.commands; "
            "from pipeline.cli import library_commands; library_commands(); "
            "assert 'prefect' not in sys.modules, 'prefect was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_demo_flow_end_to_end(tmp_path, prefect_harness):
    from flows.demo import demo_flow

    state = demo_flow(data_dir=str(tmp_path), per_class=5, workers=0, progress=False, return_state=True)
    assert state.is_completed()
    outcome = state.result()
    results = json.loads(Path(outcome["results"]).read_text())
    assert results["extraction"]["rows"] == 100 and not results["extraction"]["skipped"]
    # EfficientNet-Lite0 on 50 training digits: the probe is far above chance (10%) and the figures are recounted
    from pipeline.evaluation.predict import load_head
    from pipeline.store.read import load_store

    fs = load_store(results["extraction"]["store"])
    head = load_head(results["probe"]["head_file"])
    test = fs.mask("test")
    recount = float((head.classes[head.scores(fs.features[test]).argmax(axis=1)] == fs.labels[test]).mean())
    assert results["probe"]["test_top1"] == recount >= 0.7 and "20" in results["knn"]["by_k"]
    report = Path(outcome["report"]).read_text()
    assert "logreg probe" in report and "kNN k=20 weighted" in report
    from pipeline.report.render import md_text

    low, high = results["probe"]["test_intervals"]["top1"]
    assert low <= recount <= high
    assert md_text(f"{100 * recount:.2f} [{100 * low:.2f}, {100 * high:.2f}]") in report  # the table shows it
    assert "Seed spread: the validation slice drawn with 3 seeds" in report
    assert "## Audit" in report and results["audit"]["n_test"] == 50
    assert "data:image/png;base64," in Path(outcome["html"]).read_text()
    assert (tmp_path / "stores" / "digits-5pc__efficientnet_lite0.h5").exists()

    again = demo_flow(data_dir=str(tmp_path), per_class=5, workers=0, progress=False)
    assert again["extraction"]["skipped"]  # the store's cache key makes a rerun a no-op

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        artifacts = client.read_artifacts()
    names = {r.name for r in runs}
    assert "demo-digits-efficientnet_lite0" in names
    kinds = {a.key: a.type for a in artifacts if a.key}  # the same artifacts as a configured run, plus the report
    assert kinds.get("leaderboard-digits-5pc") == "table" and kinds.get("leaderboard-md-digits-5pc") == "markdown"
    assert any(k.startswith("results-digits-5pc") for k in kinds) and any(k.startswith("report-") for k in kinds)
    assert any(a.type == "progress" and a.data == 100.0 for a in artifacts)
    links = [str(a.data) for a in artifacts if (a.key or "").startswith("report-")]
    assert any(".report.html" in link for link in links) and any(".probe.html" in link for link in links)
