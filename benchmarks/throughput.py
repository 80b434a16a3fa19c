"""Extraction throughput against the hardware limit: ceiling, baseline and the pipeline, on the same images.

    python benchmarks/throughput.py                       # CPU: default backbone, 1,000 digit images, ~4 min
    python benchmarks/throughput.py --kind photos         # JPEG photos (heavier decode)
    python benchmarks/throughput.py --device cuda --backbone torchvision:resnet50 --workers 16 --precision bf16

Each stage runs in a fresh child process (its own peak RSS, decode workers not included), on the same image folder:
1. ceiling: the model's forward pass alone on a pre-made batch, best of the eager settings (memory format and,
   on CPU, thread count; on CUDA, the chosen precision); also the pipeline's own forward pass alone (on CPU a
   frozen TorchScript trace, see Backbone.optimized), to show how much of its own limit the pipeline reaches;
2. decode: the pipeline's DataLoader alone (no model): the most the readers can feed;
3. baseline: the loop of the seed articles: one process, num_workers=0, fp32 eager, contiguous tensors, features
   kept in a list and saved with np.save at the end;
4. pipeline: `extract_to_store`, end to end (scan, decode, model, normalise, HDF5 store), timed by the library.
Images per second exclude process start and model loading for all four. Prints a table with the ratios
pipeline/ceiling and pipeline/baseline, says which stage bounds the run, and writes JSON
(default data/benchmarks/throughput.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from images import write_digit_images, write_photo_images  # benchmarks/images.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- stages (run in children) -------------------------------------------------------------------------------------

def _backbone(cfg: dict, **overrides):
    from pipeline.backbones.factory import create_backbone

    kwargs = {"device": cfg["device"], "random_init": cfg["random_init"], "precision": cfg["precision"]}
    return create_backbone(cfg["backbone"], **{**kwargs, **overrides})


def _paths(data: Path) -> list[Path]:
    from pipeline.sources.folder import scan_image_folder

    return [s.path for s in scan_image_folder(data).samples]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_ceiling(cfg: dict) -> dict:
    import torch

    from pipeline.engine.decode import ImageDataset

    bb = _backbone(cfg)
    paths = _paths(Path(cfg["data"]))
    batch = torch.stack([ImageDataset(paths[: cfg["batch_size"]], bb.transform)[i][1]
                         for i in range(min(cfg["batch_size"], len(paths)))])
    batch = batch.to(bb.device)
    cores = os.cpu_count() or 1
    threads = sorted({cores, max(1, cores // 2)}) if bb.device.type == "cpu" else [torch.get_num_threads()]
    results = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for fmt_name, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            model = bb.model.to(memory_format=fmt)
            x = batch.contiguous(memory_format=fmt)
            autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(bb.precision)
            with torch.inference_mode(), torch.autocast(bb.device.type, dtype=autocast, enabled=autocast is not None):
                for _ in range(2):  # warm-up
                    model.features(x)
                _sync(bb.device)
                start, done = time.perf_counter(), 0
                while done < cfg["images"] or time.perf_counter() - start < 3:
                    model.features(x)
                    done += len(x)
                _sync(bb.device)
                rate = done / (time.perf_counter() - start)
            results.append({"threads": n_threads, "memory_format": fmt_name, "precision": bb.precision,
                            "images_per_s": round(rate, 1)})
    best = max(results, key=lambda r: r["images_per_s"])
    torch.set_num_threads(best["threads"])
    fast = bb.optimized()  # the pipeline's own forward pass, on the same pre-made batch
    x = batch.contiguous(memory_format=torch.channels_last)
    fast.features(x)
    _sync(bb.device)
    start, done = time.perf_counter(), 0
    while done < cfg["images"] or time.perf_counter() - start < 3:
        fast.features(x)
        done += len(x)
    _sync(bb.device)
    own = {"optimization": fast.optimization, "images_per_s": round(done / (time.perf_counter() - start), 1)}
    return {"images_per_s": best["images_per_s"], "best": best, "settings": results, "pipeline_model": own}


def stage_decode(cfg: dict) -> dict:
    from pipeline.engine.decode import ImageDataset
    from pipeline.engine.forward import default_workers
    from pipeline.engine.threads import prefetch
    from pipeline.engine.workers import supervised_batches
    from pipeline.plan import DecodeSpec

    bb = _backbone(cfg)
    workers = default_workers() if cfg["workers"] is None else cfg["workers"]
    dataset = ImageDataset(_paths(Path(cfg["data"])), bb.transform)
    batches = supervised_batches(dataset, batch_size=cfg["batch_size"] or 64, workers=workers,
                              timeout=DecodeSpec().decode_timeout, pin_memory=bb.device.type == "cuda")
    start, done, first = time.perf_counter(), 0, None
    for batch in prefetch(batches):
        done += len(batch.indices) + len(batch.failures)
        first = first or (time.perf_counter() - start, done)  # the workers' start-up is in the first batch's wait
    wall = time.perf_counter() - start
    after = (done - first[1]) / (wall - first[0]) if first and wall > first[0] else 0.0
    return {"images_per_s": round(done / wall, 1), "workers": workers, "first_batch_s": round(first[0], 2),
            "after_first_batch_images_per_s": round(after, 1)}


def stage_baseline(cfg: dict) -> dict:
    """The seed articles' loop, written as they write it."""
    import torch
    from PIL import Image

    bb = _backbone(cfg, precision="fp32")
    model = bb.model.to(memory_format=torch.contiguous_format)
    paths = _paths(Path(cfg["data"]))

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return bb.transform(Image.open(paths[i]).convert("RGB"))

    loader = torch.utils.data.DataLoader(Folder(), batch_size=cfg["batch_size"] or 64, num_workers=0)
    start = time.perf_counter()
    feats = []
    with torch.no_grad():
        for x in loader:
            f = model.features(x.to(bb.device))
            feats.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy())
    np.save(Path(cfg["scratch"]) / "baseline.npy", np.concatenate(feats))
    return {"images_per_s": round(len(paths) / (time.perf_counter() - start), 1)}


def stage_pipeline(cfg: dict) -> dict:
    from pipeline.engine.runner import extract_to_store
    from pipeline.plan import ExtractConfig

    bb = _backbone(cfg, compile=cfg["compile"])
    bb = bb if cfg["compile"] else bb.optimized()
    out = Path(cfg["scratch"]) / f"pipeline_{time.time_ns()}.h5"
    start = time.perf_counter()
    result = extract_to_store(ExtractConfig.of(data=Path(cfg["data"]), out=out, batch_size=cfg["batch_size"],
                                            workers=cfg["workers"], progress=False), backbone=bb)
    wall = time.perf_counter() - start
    return {"images_per_s": round(result.rows / wall, 1), "library_images_per_s": round(result.images_per_second, 1),
            "rows": result.rows, "precision": bb.precision}


STAGES = {"ceiling": stage_ceiling, "decode": stage_decode, "baseline": stage_baseline, "pipeline": stage_pipeline}


def run_stage(name: str, cfg: dict) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, json.dumps(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"stage {name} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(result.pop("_rss_kib") / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random-init", action="store_true", help="for architectures without local weights")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--kind", choices=("digits", "photos"), default="digits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: the pipeline's choice)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also torch.compile in the pipeline stage")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "benchmarks" / "throughput.json")
    args = parser.parse_args()
    if args.child:
        import resource

        result = STAGES[args.child[0]](json.loads(args.child[1]))
        result["_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return

    from pipeline.engine.devices import resolve_device

    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory(prefix="throughput_") as scratch:
        data = Path(scratch) / "images"
        (write_digit_images if args.kind == "digits" else write_photo_images)(data, args.images)
        cfg = {"backbone": args.backbone, "random_init": args.random_init, "data": str(data), "device": device,
               "precision": args.precision, "workers": args.workers, "batch_size": args.batch_size,
               "images": args.images, "scratch": scratch, "compile": args.compile}
        stages = {name: run_stage(name, cfg) for name in ("ceiling", "decode", "baseline", "pipeline")}
    ceiling, decode = stages["ceiling"]["images_per_s"], stages["decode"]["images_per_s"]
    pipeline, baseline = stages["pipeline"]["images_per_s"], stages["baseline"]["images_per_s"]
    limit = min(ceiling, decode)
    bound = "model" if ceiling <= decode else "decode"
    summary = {
        "device": device, "cores": os.cpu_count(), "backbone": args.backbone, "images": args.images,
        "kind": args.kind, "batch_size": args.batch_size, "stages": stages,
        "pipeline_over_ceiling": round(pipeline / ceiling, 3), "pipeline_over_baseline": round(pipeline / baseline, 3),
        "pipeline_over_limit": round(pipeline / limit, 3), "bound_by": bound,
        "pipeline_over_own_model": round(pipeline / stages["ceiling"]["pipeline_model"]["images_per_s"], 3),
    }
    print(f"{args.backbone} on {device} ({os.cpu_count()} cores), {args.images} {args.kind} images, batch "
          f"{args.batch_size}")
    print(f"  {'stage':10s} {'img/s':>8s} {'peak RSS MiB':>13s}  notes")
    notes = {"ceiling": f"best of {len(stages['ceiling']['settings'])} eager settings: "
                        + json.dumps(stages["ceiling"]["best"]),
             "decode": f"{stages['decode']['workers']} worker process(es)"
                       + (" + decode thread" if not stages["decode"]["workers"] else "")
                       + f"; first batch after {stages['decode']['first_batch_s']} s (the workers' start), "
                         f"{stages['decode']['after_first_batch_images_per_s']} img/s after it",
             "baseline": "num_workers=0, fp32 eager, contiguous, np.save at the end",
             "pipeline": f"extract_to_store end to end ({stages['pipeline']['precision']})"}
    for name, r in stages.items():
        print(f"  {name:10s} {r['images_per_s']:>8} {r['peak_rss_mib']:>13}  {notes[name]}")
    print(f"  pipeline / ceiling  = {summary['pipeline_over_ceiling']}")
    print(f"  pipeline / baseline = {summary['pipeline_over_baseline']}")
    print(f"  bound by the {bound} stage (limit {limit} img/s); pipeline / limit = {summary['pipeline_over_limit']}")
    own = stages["ceiling"]["pipeline_model"]
    print(f"  the pipeline's own forward pass alone ({own['optimization']}): {own['images_per_s']} img/s; "
          f"pipeline / that = {summary['pipeline_over_own_model']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
