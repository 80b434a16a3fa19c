"""Command line for evaluation on cached features: probe, predict, knn, audit, index, search, bench."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli import Command
from pipeline.cli.types import auto_or, bounded_int, finite_float, memory_size, names, number_list, positive_int
from pipeline.config import (
    DEFAULT_KS,
    DEFAULT_RESAMPLES,
    DINOV2_KS,
    DINOV2_TEMPERATURE,
    MAX_RESAMPLES,
    KnnConfig,
    ProbeConfig,
)
from pipeline.errors import PipelineError

OVERWRITE_HELP = "replace output files that exist and were not written by this command"


def add_max_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=memory_size, default=None,
                   help="feature data held in memory at once (e.g. 4GiB; default half the available memory): within "
                        "it the store is loaded whole, beyond it streamed in blocks")


def add_resamples(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=bounded_int(0, MAX_RESAMPLES), default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples of the test images for the 95%% intervals (default {DEFAULT_RESAMPLES}; "
                        "0: no intervals)")


def _heads() -> dict:
    from pipeline.evaluation.heads import HEADS

    return HEADS


def add_probe(p: argparse.ArgumentParser) -> None:
    heads = _heads()
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: STORE.probe.json beside the store)")
    p.add_argument("--head", choices=list(heads), default="logreg",
                   help="; ".join(f"{s.name}: {s.description}" for s in heads.values()))
    p.add_argument("--grid", "--C", dest="grid", type=number_list(float, "0.1,1,10"), default=None,
                   help="values of the head's hyper-parameter (C, or alpha for ridge/mlp) to choose from")
    p.add_argument("--val-fraction", type=finite_float(0, 1, low_open=True, high_open=True), default=0.2,
                   help="train slice held out when there is no val split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=number_list(int, "1,5,10"), default=(),
                   help="few-shot probes: this many training images per class (comma-separated)")
    p.add_argument("--seeds", type=number_list(int, "0,1,2", positive=False), default=(0, 1, 2),
                   help="few-shot draws, one per seed (default 0,1,2)")
    p.add_argument("--val-seeds", type=number_list(int, "0,1,2", positive=False), default=(),
                   help="without a val split: also choose on the slice drawn with each of these seeds and report the "
                        "spread of test top-1 over them")
    p.add_argument("--views", action="store_true",
                   help="also train on the store's augmented views of the training images (extract --views K)")
    add_resamples(p)
    add_max_memory(p)
    p.add_argument("--epochs", type=bounded_int(1, 100_000), default=30,
                   help="streamed torch-logreg (a store beyond --max-memory): at most this many passes per C")
    p.add_argument("--device", default="auto", help="torch-logreg only: auto | cpu | cuda")
    p.add_argument("--no-report", action="store_true", help="only the JSON (no markdown/HTML report)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", required=True, type=Path,
                   help="a .head.safetensors written by probe, or a .model.safetensors written by finetune")
    p.add_argument("images", nargs="*", type=Path, help="image files to classify")
    p.add_argument("--store", type=Path, default=None, help="classify every row of this store instead")
    p.add_argument("--top", type=positive_int, default=1, help="classes per image (default 1)")
    p.add_argument("--out", type=Path, default=None, help="write the predictions as CSV")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=Path, default=None, help="the checkpoint, for heads on --weights features")


def add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, help="a store extracted with --layer BLOCK --keep-spatial")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: STORE.finetune.json beside the store)")
    p.add_argument("--blocks", type=bounded_int(0, 1000), default=1,
                   help="trailing blocks of the network after BLOCK to train with the head (default 1; 0: the head "
                        "alone)")
    p.add_argument("--epochs", type=bounded_int(1, 100_000), default=30, help="at most this many (default 30)")
    p.add_argument("--patience", type=bounded_int(1, 100_000), default=5,
                   help="stop after this many epochs without a lower validation loss (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr-block", type=finite_float(0), default=1e-4, help="learning rate of the blocks (1e-4)")
    p.add_argument("--lr-head", type=finite_float(0), default=1e-3, help="learning rate of the head (1e-3)")
    p.add_argument("--weight-decay", type=finite_float(0), default=0.05, help="AdamW weight decay (0.05)")
    p.add_argument("--label-smoothing", type=finite_float(0, 1, high_open=True), default=0.0)
    p.add_argument("--views", action="store_true", help="also train on the store's augmented views (extract --views)")
    p.add_argument("--val-fraction", type=finite_float(0, 1, low_open=True, high_open=True), default=0.2,
                   help="train slice held out when there is no val split")
    p.add_argument("--max-memory", type=memory_size, default=2 << 30,
                   help="activations held in memory (default 2GiB); beyond it they are read per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_resamples(p)
    p.add_argument("--no-report", action="store_true", help="only the JSON (no markdown/HTML report)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def cmd_finetune(args: argparse.Namespace) -> None:
    from pipeline.config import FinetuneConfig
    from pipeline.evaluation.finetune import run_finetune
    from pipeline.report.blocks import format_table

    result, out = run_finetune(FinetuneConfig(
        store=args.store, out=args.out, blocks=args.blocks, epochs=args.epochs, patience=args.patience,
        batch_size=args.batch_size, lr_block=args.lr_block, lr_head=args.lr_head, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, views=args.views, val_fraction=args.val_fraction,
        max_memory=args.max_memory, seed=args.seed, device=args.device, resamples=args.resamples,
        report=not args.no_report, overwrite=args.overwrite))
    print(f"best epoch {result['chosen']} of {result['epochs_run']} (val top-1 "
          f"{100 * result['val_top1_by_value'][str(result['chosen'])]:.2f}%), {result['seconds']:.1f} s")
    print(format_table(result, None))
    files = [f"results: {out}", f"model: {result['model_file']}"]
    files += [f"report: {result['report'][1]}"] if result.get("report") else []
    print("  ".join(files))


def add_knn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--preset", choices=("dinov2",), default=None,
                   help=f"dinov2: k in {{{','.join(map(str, DINOV2_KS))}}}, T={DINOV2_TEMPERATURE}")
    p.add_argument("--k", dest="ks", type=number_list(int, "1,20"), default=None,
                   help=f"comma-separated (default {','.join(map(str, DEFAULT_KS))})")
    p.add_argument("--temperature", type=finite_float(0, low_open=True), default=None,
                   help=f"weighted vote (default {DINOV2_TEMPERATURE})")
    p.add_argument("--loo", action="store_true", help="leave-one-out within one split even when there is a test split")
    p.add_argument("--loo-split", default=None, help="the split for leave-one-out (default train)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: STORE.knn.json beside the store)")
    add_resamples(p)
    add_max_memory(p)
    p.add_argument("--index", type=Path, default=None,
                   help="approximate: search through this index folder (index build --splits of the searched rows); "
                        "the gap to exact search is measured on a sample and recorded")
    p.add_argument("--approx", action="store_true",
                   help="approximate: build a tuned index over the searched rows (within --memory-budget) and search "
                        "through it; the gap to exact search is measured on a sample and recorded")
    p.add_argument("--memory-budget", type=memory_size, default=4 * 2**30,
                   help="--approx: the memory the index may take (default 4GiB)")
    p.add_argument("--queries", type=positive_int, default=None,
                   help="score a seeded sample of this many queries (default: all); for quick figures at scale")
    p.add_argument("--device", default="auto", help="the exact search: auto | cpu (FAISS) | cuda | cuda:N (torch)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_index(p: argparse.ArgumentParser) -> None:
    from pipeline.index.plan import DEFAULT_MEMORY_BUDGET, INDEX_KINDS

    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = actions.add_parser("build", help="choose the type by rows and memory budget, build, tune, save")
    q.add_argument("--store", required=True, type=Path)
    q.add_argument("--out", required=True, type=Path, help="the index folder to write")
    q.add_argument("--type", dest="kind", choices=INDEX_KINDS, default="auto")
    q.add_argument("--memory-budget", type=memory_size, default=DEFAULT_MEMORY_BUDGET,
                   help=f"memory the index may take (default {DEFAULT_MEMORY_BUDGET / 2**30:g}GiB)")
    q.add_argument("--target-recall", type=finite_float(0, 1, low_open=True), default=0.95,
                   help="recall@10 to tune for (default 0.95)")
    q.add_argument("--splits", type=names, default=None, help="only these splits (default: all rows)")
    q.add_argument("--queries", type=positive_int, default=1000, help="rows sampled to measure recall (default 1000)")
    add_max_memory(q)
    q.add_argument("--overwrite", action="store_true", help="replace an index folder of another store at --out")
    q = actions.add_parser("add", help="add the store's new rows (rebuilds when indexed rows changed)")
    q.add_argument("index", type=Path)
    q.add_argument("--store", type=Path, default=None, help="default: the store the index was built from")
    q = actions.add_parser("info", help="print index_infos.json")
    q.add_argument("index", type=Path)


def add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, default=None, help="an index folder (default: exact search of --store)")
    p.add_argument("--store", type=Path, default=None, help="the store (default: the index's)")
    p.add_argument("--image", dest="images", type=Path, nargs="+", default=[], help="query image files")
    p.add_argument("--id", dest="ids", nargs="+", default=[], help="query by ids of the store")
    p.add_argument("--k", type=positive_int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=Path, default=None, help="the checkpoint, for stores made with --weights")
    add_max_memory(p)


def add_audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: STORE.audit.json beside the store)")
    p.add_argument("--threshold", type=auto_or(finite_float(0, 1, low_open=True)), default=None,
                   help="near duplicates: cosine at or above this, or auto (default): halfway between the store's "
                        "nearest other-class cosine and 1, within [0.95, 0.995] (see README)")
    p.add_argument("--k", type=positive_int, default=10, help="neighbours searched per row (default 10)")
    p.add_argument("--knn-k", type=positive_int, default=20, help="kNN k for the test figure (weighted vote)")
    p.add_argument("--head", choices=list(_heads()), default="logreg", help="the probe for the test figure")
    p.add_argument("--no-fit", action="store_true", help="find only: no probe or kNN figures")
    p.add_argument("--device", default="auto", help="the searches: auto | cpu (FAISS) | cuda | cuda:N (torch)")
    p.add_argument("--write-splits", type=Path, default=None,
                   help="write a clean split assignment (CSV id,split,audit: leaked test images and repeated copies "
                        "within a split dropped)")
    p.add_argument("--write-manifest", type=Path, default=None,
                   help="write a manifest (path,label,split,id) of the rows the clean assignment keeps, to extract "
                        "again with --data")
    add_resamples(p)
    add_max_memory(p)
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _span(threshold: dict) -> str:
    low, high = threshold["min"], threshold["max"]
    return f"{low:.4f}" if low == high else f"{low:.4f} to {high:.4f} by class"


def cmd_audit(args: argparse.Namespace) -> None:
    from pipeline.config import AuditConfig
    from pipeline.evaluation.audit_run import run_audit
    from pipeline.report.blocks import pct_interval, text_table

    result, out = run_audit(AuditConfig(
        store=args.store, out=args.out, threshold=args.threshold, k=args.k, fit=not args.no_fit, head=args.head,
        knn_k=args.knn_k, resamples=args.resamples, write_splits=args.write_splits,
        write_manifest=args.write_manifest, report=not args.no_report, overwrite=args.overwrite,
        max_memory=args.max_memory, device=args.device))
    print(f"{result['n_rows']} rows: {result['exact_pairs']} exact and {result['near_pairs']} near duplicate pairs "
          f"(threshold {_span(result['threshold'])}), {result['cross_split_pairs']} across splits; "
          f"{result['leaked_test_rows']} of {result['n_test']} test images have a copy in train/val")
    rows = [(name, pct_interval(e["all"], e.get("all_interval")),
             pct_interval(e["without_leaked"], e.get("without_leaked_interval")))
            for name, e in result["scores"].items() if isinstance(e, dict) and "all" in e]
    if rows:
        print(text_table(("figure", "top-1 % all test", "top-1 % without leaked"), rows))
    print("  ".join([f"results: {out}", *(f"{k}: {v}" for k, v in result["files"].items() if k != "results"),
                     *([f"report: {result['report'][1]}"] if result.get("report") else [])]))


BENCH_EXTRACT = ("batch_size", "workers", "device", "random_init")  # extraction options bench passes on


def add_bench(p: argparse.ArgumentParser) -> None:
    from pipeline.cli.extract import add_spec_arguments

    p.add_argument("--data", required=True, help="as for extract")
    p.add_argument("--backbones", required=True, type=names, help="comma-separated backbone names")
    p.add_argument("--out-dir", type=Path, default=Path("data/bench"))
    p.add_argument("--head", choices=list(_heads()), default="logreg")
    p.add_argument("--k", type=positive_int, default=20, help="kNN k for the leaderboard (weighted vote, T=0.07)")
    p.add_argument("--reset-leaderboard", action="store_true",
                   help="start the leaderboard afresh (by default rows of backbones not in this run are kept)")
    add_resamples(p)
    add_spec_arguments(p, only=BENCH_EXTRACT)


def cmd_probe(args: argparse.Namespace) -> None:
    from pipeline.evaluation.probes import run_probe
    from pipeline.report.blocks import format_table

    result, out = run_probe(ProbeConfig(store=args.store, out=args.out, head=args.head, grid=args.grid,
                                        val_fraction=args.val_fraction, seed=args.seed, shots=args.shots,
                                        seeds=args.seeds, device=args.device, report=not args.no_report,
                                        overwrite=args.overwrite, resamples=args.resamples,
                                        val_seeds=args.val_seeds, views=args.views, max_memory=args.max_memory,
                                        epochs=args.epochs))
    print(format_table(result, None))
    files = [f"results: {out}"] + ([f"head: {result['head_file']}"] if "head_file" in result else [])
    files += [f"report: {result['report'][1]}"] if result.get("report") else []
    print("  ".join(files))


def cmd_predict(args: argparse.Namespace) -> None:
    from pipeline.evaluation.predict import load_head, predict_images, predict_store
    from pipeline.outputs import check_output, owned_text, write_atomic
    from pipeline.report.tables import csv_text

    if bool(args.images) == bool(args.store):
        raise PipelineError("give image files or --store (one of them)")
    header = ["id", *[f"{what}_{i}" for i in range(1, args.top + 1) for what in ("class", "score")]]
    target = None
    if args.out:
        target = check_output(args.out, owned=owned_text(",".join(header)), overwrite=args.overwrite,
                              protect=[p for p in (args.store, args.head) if p])
    from pipeline.evaluation.finetune_model import is_tuned_model, load_tuned, predict_images_tuned

    if is_tuned_model(args.head):
        if args.store:
            raise PipelineError("a fine-tuned model classifies image files (it needs their activations); give "
                                "image files instead of --store")
        rows = predict_images_tuned(load_tuned(args.head, device=args.device, weights_path=args.weights),
                                    args.images, top=args.top)
    else:
        head = load_head(args.head)
        rows = predict_store(head, args.store, top=args.top) if args.store else \
            predict_images(head, args.images, top=args.top, device=args.device, weights_path=args.weights)
    text = csv_text(header, [[r["id"], *[v for name, score in r["predictions"] for v in (name, f"{score:.4f}")]]
                             for r in rows])
    if target is None:
        print(text, end="")
        return
    write_atomic(target, text)
    print(f"{len(rows)} predictions: {args.out}")


def cmd_knn(args: argparse.Namespace) -> None:
    from pipeline.evaluation.knn import run_knn
    from pipeline.report.blocks import format_table, retrieval_rows, text_table

    ks = args.ks or (DINOV2_KS if args.preset == "dinov2" else DEFAULT_KS)
    temperature = args.temperature if args.temperature is not None else DINOV2_TEMPERATURE
    result, out = run_knn(KnnConfig(store=args.store, out=args.out, ks=tuple(ks), temperature=temperature,
                                    loo=args.loo, loo_split=args.loo_split, report=not args.no_report,
                                    overwrite=args.overwrite, resamples=args.resamples, max_memory=args.max_memory,
                                    index=args.index, approx=args.approx, memory_budget=args.memory_budget,
                                    queries=args.queries or 0, device=args.device))
    print(f"{result['mode']}: {result['n_queries']} queries, {result['n_bank']} rows searched"
          + (f" (streamed, blocks of {result['streamed']['block_rows']} rows)" if "streamed" in result else ""))
    if "approximate" in result:
        gaps = ", ".join(f"k={key} {g['gap_points']:+.2f}" for key, g in result["approximate"]["gap"].items())
        print(f"approximate: {result['approximate']['factory']}; top-1 below exact on "
              f"{result['approximate']['gap_queries']} sampled queries, in points: {gaps}")
    print(format_table(None, result))
    if result["retrieval"]:
        print(text_table(("k", "recall@k %", "precision@k %", "mAP@k %"), retrieval_rows(result["retrieval"])))
    print(f"results: {out}" + (f"  report: {result['report'][1]}" if result.get("report") else ""))


def cmd_index(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from pipeline.index.build import build_index, update_index
    from pipeline.index.files import load_index

    if args.index_command == "info":
        print(json.dumps(asdict(load_index(args.index).infos), indent=2))
        return
    if args.index_command == "add":
        infos = update_index(args.index, store=args.store)
        out = args.index
    else:
        infos = build_index(args.store, args.out, kind=args.kind, memory_budget=args.memory_budget,
                            target_recall=args.target_recall, splits=tuple(args.splits) if args.splits else None,
                            queries=args.queries, overwrite=args.overwrite, max_memory=args.max_memory)
        out = args.out
    setting = f", {infos.search_param}={infos.search_value}" if infos.search_param else ""
    print(f"{out}: {infos.factory} over {infos.rows} rows ({infos.reason}){setting}; recall@10 "
          f"{infos.recall_at_10:.4f} on {infos.tuning_queries} queries, {infos.ms_per_query:.3f} ms/query, about "
          f"{infos.memory_estimate / 2**20:.1f} MiB")


def cmd_search(args: argparse.Namespace) -> None:
    from pipeline.index.search import search_store

    hits = search_store(index=args.index, store=args.store, images=args.images, ids=args.ids, k=args.k,
                        device=args.device, weights_path=args.weights, max_memory=args.max_memory)
    if args.json:
        print(json.dumps(hits, indent=2))
        return
    for query in hits:
        print(f"query {query['query']}:")
        for rank, h in enumerate(query["hits"], 1):
            print(f"  {rank:3d}  {h['score']:.4f}  {h['id']}  {h['label'] or ''}  {h['path'] or ''}".rstrip())


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.recipe import data_name, leaderboard_title, run_bench
    from pipeline.report.leaderboard import leaderboard_text

    extract = {name: getattr(args, name) for name in BENCH_EXTRACT}
    rows, csv_path, md_path = run_bench(args.data, args.backbones, args.out_dir, head=args.head, k=args.k,
                                        extract=extract, progress=not args.quiet, reset=args.reset_leaderboard,
                                        resamples=args.resamples)
    title = leaderboard_title(data_name(args.data), args.head, args.k, DINOV2_TEMPERATURE)
    print(leaderboard_text(rows, title=title))
    print(f"leaderboard: {csv_path}  {md_path} (paired comparisons and feature agreement in the markdown)")
    failed = [r for r in rows if r.error]
    return 1 if failed else 0


COMMANDS = [
    Command("probe", "a head on a store's features: hyper-parameter chosen on validation, refit, tested once; or "
                     "few-shot probes", add_probe, cmd_probe),
    Command("finetune", "train the last blocks of the backbone and a new head on a store's cached activations "
                        "(extract --keep-spatial), early stopping on validation, tested once", add_finetune,
            cmd_finetune),
    Command("predict", "apply a saved probe head or fine-tuned model to image files or to a store", add_predict,
            cmd_predict),
    Command("knn", "kNN classification and retrieval metrics on an exact FAISS index", add_knn, cmd_knn),
    Command("index", "build, update or inspect a FAISS index for a store", add_index, cmd_index),
    Command("search", "nearest images to query image files or ids", add_search, cmd_search),
    Command("audit", "duplicates and train/test leakage (exact and near), test figures without leaked images, "
                     "label-noise and outlier hints", add_audit, cmd_audit),
    Command("bench", "backbones x one data set -> leaderboard CSV + markdown (stores cached)", add_bench, cmd_bench),
]
