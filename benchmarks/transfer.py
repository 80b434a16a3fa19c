"""Transfer learning on cached activations: what tuning the top adds over a linear probe, and at what cost.

    python benchmarks/transfer.py storage               # activation size per image for common backbones
    python benchmarks/transfer.py digits [--epochs 30 --full-epochs 15]
    python benchmarks/transfer.py icons  [--epochs 30 --full-epochs 15]

`storage` builds each backbone without weights (random init: nothing is downloaded) and prints the shape of the
output of the blocks `extract --layer ... --keep-spatial` would keep, and its float16 size per image and per million
images.

`digits` and `icons` run `python -m pipeline transfer` (every method in its own process, wall time and peak RSS
from wait4) on a real data set with the packaged EfficientNet-Lite0, and print its table: scikit-learn's 1,797
digits (its own 70/30 split), and the 32x32 icons of Debian's tango-icon-theme and gnome-icon-theme classified by
their context folder (actions, apps, devices, mimetypes, ...; apt-get download, unpacked in a temporary folder,
never committed; a stratified 70/30 split by content).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORAGE = [  # (backbone, block kept, what finetune can then train)
    ("timm:resnet50", "layer3", "layer4 (3 bottlenecks)"),
    ("timm:resnet50", "layer4.1", "-- (not a trunk block: refused)"),
    ("efficientnet_lite0", "blocks.4", "blocks.5, blocks.6"),
    ("efficientnet_lite0", "blocks.5", "blocks.6"),
    ("timm:convnext_tiny", "stages.2", "stages.3"),
    ("timm:vit_base_patch16_224", "blocks.9", "blocks.10, blocks.11"),
    ("timm:vit_small_patch16_224", "blocks.9", "blocks.10, blocks.11"),
    ("torchvision:resnet50", "layer3", "layer4"),
]


def storage() -> list[dict]:
    import numpy as np

    from pipeline.backbones.factory import create_backbone
    from pipeline.backbones.top import build_top
    from pipeline.errors import PipelineError

    print("| backbone | kept block | shape per image | float16 per image | per 1M images | trainable after it |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, layer, after in STORAGE:
        backbone = create_backbone(name, random_init=True, keep=layer)
        try:
            top = build_top(backbone.model, layer, backbone.data_config["input_size"])
            after = f"{len(top.blocks)} block(s): {after}"
        except PipelineError as exc:
            after = f"refused: {str(exc)[:60]}..."
        size = int(np.prod(backbone.spatial_shape)) * 2
        shape = "x".join(map(str, backbone.spatial_shape))
        print(f"| {name} | {layer} | {shape} | {size / 1024:.0f} KiB | {size * 1e6 / 2**30:.0f} GiB | {after} |")
        rows.append({"backbone": name, "layer": layer, "shape": list(backbone.spatial_shape), "bytes": size,
                     "trainable": after})
    return rows


def icons_folder(where: Path, *, min_per_class: int = 10) -> Path:
    """The 32x32 icons of Debian's tango-icon-theme and gnome-icon-theme as ROOT/<context>/<theme>_<icon>.png: real
    files only (the themes' symbolic links are aliases of the same pictures, which would leak across splits), in
    the contexts with at least `min_per_class` icons."""
    root = where / "icons"
    for package in ("tango-icon-theme", "gnome-icon-theme"):
        subprocess.run(["apt-get", "download", package], cwd=where, check=True, capture_output=True)
        deb = next(where.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(where / package)], check=True)
        for path in sorted((where / package).rglob("32x32/*/*.png")):
            if path.is_symlink():
                continue
            target = root / path.parent.name / f"{package.split('-')[0]}_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    for folder in list(root.iterdir()):
        if len(list(folder.iterdir())) < min_per_class:
            shutil.rmtree(folder)
    return root


def transfer(data: Path, out: Path, args: argparse.Namespace) -> None:
    argv = [sys.executable, "-m", "pipeline", "--quiet", "transfer", "--data", str(data), "--out-dir", str(out),
            "--epochs", str(args.epochs), "--full-epochs", str(args.full_epochs), "--views", str(args.views),
            "--extract-args", "--workers 0"]
    print("$ python -m pipeline transfer --data", data.name, " ".join(argv[7:]), flush=True)
    subprocess.run(argv, cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("storage", "digits", "icons"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--full-epochs", type=int, default=15)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep the stores and results in this folder")
    parser.add_argument("--out", type=Path, default=None, help="storage: also write the rows as JSON")
    args = parser.parse_args()
    if args.what == "storage":
        rows = storage()
        if args.out:
            args.out.write_text(json.dumps({"storage": rows}, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = args.keep or tmp / "out"
        if args.what == "digits":
            from pipeline.demo import write_digits_folder

            data = write_digits_folder(tmp / "digits")
        else:
            data = icons_folder(tmp)
        transfer(data, out, args)


if __name__ == "__main__":
    main()
