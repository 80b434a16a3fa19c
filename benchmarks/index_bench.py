"""Index choice at scale: `index build`'s automatic choice against autofaiss's for the same memory budget.

A synthetic float16 store (`pipeline.store.synthetic`, 1M x 128-d by default) is indexed twice, each in its own
process (wall time and peak RSS measured from this parent): by `python -m pipeline index build --memory-budget B`,
and by autofaiss (`Quantizer().quantize(max_index_memory_usage=B)`) on the store's clip-retrieval export (what
users would hand it). Both indexes are then searched with the same 1,000 sampled rows as queries and scored
against exact search: recall@10 (each query's own row left out), ms/query, index file size.

    python benchmarks/index_bench.py                          # 1,000,000 rows, 256 MiB budget
    python benchmarks/index_bench.py --rows 20000 --budget 4MiB
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import run  # noqa: E402, I001 - one way to run a measured child, shared with the scale benchmark

AUTOFAISS = """
import sys
import faiss
import autofaiss.indices.index_factory as factory
from autofaiss.external.quantize import Quantizer

class OPQMatrix(faiss.OPQMatrix):  # autofaiss 1.10 passes M=, d2= by name, which faiss 1.15 refuses
    def __init__(self, d, M=1, d2=-1):
        super().__init__(d, M, d2)

factory.faiss.OPQMatrix = OPQMatrix
Quantizer().quantize(embeddings_path=sys.argv[1], output_path=sys.argv[2], max_index_memory_usage=sys.argv[3],
                     current_memory_available="8G", metric_type="ip", nb_cores=2)
"""


def measure(index, vectors, queries: list[int], k: int = 10) -> dict:
    """recall@10 against exact search (own row left out) and ms/query, on the given rows as queries."""
    import faiss
    import numpy as np

    from pipeline.index.build import recall_at_k

    q = vectors[queries]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(q, k + 1)
    start = time.perf_counter()
    _, found = index.search(q, k + 1)
    ms = 1000 * (time.perf_counter() - start) / len(queries)
    return {"recall_at_10": round(recall_at_k(found, truth, np.asarray(queries), k), 4), "ms_per_query": round(ms, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", default="256MiB")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("data/benchmarks/index_bench"))
    parser.add_argument("--out", type=Path, default=Path("data/benchmarks/index_bench.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    import shutil

    for p in work.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    made = run(["-m", "pipeline.store.synthetic", "--rows", str(args.rows), "--dim", str(args.dim), "--out",
                "s.h5"], work)
    ours = run(["-m", "pipeline", "index", "build", "--store", "s.h5", "--out", "ours", "--memory-budget",
                args.budget], work)
    run(["-m", "pipeline", "export", "--store", "s.h5", "--format", "clip-retrieval", "--out", "emb",
         "--dtype", "float32"], work)
    budget_text = args.budget.replace("iB", "B").replace("MB", "M").replace("GB", "G")
    theirs = run(["-c", AUTOFAISS, str(work / "emb" / "img_emb"), str(work / "af"), budget_text], work)

    import faiss
    import numpy as np

    from pipeline.index.files import load_index

    vectors = np.concatenate([np.load(f) for f in sorted((work / "emb" / "img_emb").glob("*.npy"))])
    queries = sorted(np.random.default_rng(0).choice(len(vectors), size=args.queries, replace=False).tolist())
    loaded = load_index(work / "ours")
    infos = loaded.infos
    af_index = faiss.read_index(str(next((work / "af").glob("*.index"))))
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    af_key = get_optimal_index_keys_v2(len(vectors), vectors.shape[1], budget_text)[0]  # what it chose (and built)
    af_ivf = faiss.try_extract_index_ivf(af_index) if "IVF" in af_key else None
    af_search = f"nprobe={af_ivf.nprobe}" if af_ivf is not None else ""  # its tuned setting, saved in the file
    result = {
        "config": {k: str(v) for k, v in vars(args).items()}, "store": made,
        "ours": {"factory": infos.factory, **ours,
                 "search": f"{infos.search_param}={infos.search_value}" if infos.search_param else "-",
                 "build_seconds_inside": infos.seconds,
                 "index_mib": round((work / "ours" / "index.faiss").stat().st_size / 2**20, 1),
                 **measure(loaded.index, vectors, queries)},
        "autofaiss": {"factory": af_key, "search": af_search or "-", **theirs,
                      "index_mib": round(next((work / "af").glob("*.index")).stat().st_size / 2**20, 1),
                      **measure(af_index, vectors, queries)},
    }
    print(f"{args.rows:,} rows x {args.dim}-d, budget {args.budget}")
    print("| builder | index | search | build s | peak RSS MiB | index MiB | recall@10 | ms/query |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("ours", "autofaiss"):
        r = result[name]
        print(f"| {name} | `{r['factory']}` | {r['search']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['index_mib']:.1f} | {r['recall_at_10']:.4f} | {r['ms_per_query']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
