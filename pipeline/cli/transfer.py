"""Command line for the transfer comparison: `finetune-images` (the full fine-tune loop from images, the reference)
and `transfer` (every way of transferring a backbone to one data set, in one table). `finetune` itself is with the
other evaluation commands (`pipeline.cli.evaluate`)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pipeline.cli import Command
from pipeline.cli.evaluate import add_resamples
from pipeline.cli.types import bounded_int, finite_float, number_list, positive_int
from pipeline.config import DEFAULT_BACKBONE


def add_finetune_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, help="a store of the data set: its splits, labels and images")
    p.add_argument("--out", required=True, type=Path, help="results JSON")
    p.add_argument("--epochs", type=bounded_int(1, 10_000), default=15, help="at most this many (15)")
    p.add_argument("--patience", type=bounded_int(1, 10_000), default=3,
                   help="stop after this many epochs without a lower validation loss (3)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr-block", type=finite_float(0), default=1e-4, help="learning rate of the backbone (1e-4)")
    p.add_argument("--lr-head", type=finite_float(0), default=1e-3, help="learning rate of the head (1e-3)")
    p.add_argument("--max-images", type=positive_int, default=5000,
                   help="refuse larger data sets (default 5000): this loop re-runs the whole network every epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_resamples(p)


def cmd_finetune_images(args: argparse.Namespace) -> None:
    from pipeline.config import FullFinetuneConfig
    from pipeline.evaluation.full_finetune import full_finetune

    result = full_finetune(FullFinetuneConfig(
        store=args.store, out=args.out, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
        lr_block=args.lr_block, lr_head=args.lr_head, max_images=args.max_images, seed=args.seed,
        device=args.device, resamples=args.resamples))
    print(f"full fine-tune: test top-1 {100 * result['test_top1']:.2f}% (best epoch {result['chosen']} of "
          f"{result['epochs_run']}, {result['seconds']:.1f} s) -> {args.out}")


def add_transfer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="as for extract")
    p.add_argument("--out-dir", required=True, type=Path, help="the store, every results JSON and the table")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--layer", default="blocks.4", help="the block whose output is cached (default blocks.4: "
                                                       "EfficientNet-Lite's last two stages are trained after it)")
    p.add_argument("--views", type=bounded_int(0, 100), default=2, help="augmented views per training image (2)")
    p.add_argument("--blocks", type=number_list(int, "1,2", positive=False), default=(1, 2),
                   help="fine-tune this many trailing blocks, one run each (default 1,2)")
    p.add_argument("--epochs", type=positive_int, default=30, help="finetune epochs at most (30)")
    p.add_argument("--full-epochs", type=positive_int, default=15, help="full fine-tune epochs at most (15)")
    p.add_argument("--no-full", action="store_true", help="leave out the full fine-tune loop from images")
    p.add_argument("--full-max-images", type=positive_int, default=5000)
    p.add_argument("--extract-args", type=shlex.split, default=[], help="more extract options, e.g. '--workers 0'")
    p.add_argument("--finetune-args", type=shlex.split, default=[], help="more options of finetune and "
                                                                          "finetune-images, e.g. '--device cuda'")
    add_resamples(p)


def cmd_transfer(args: argparse.Namespace) -> None:
    from pipeline.transfer import TransferConfig, run_transfer

    result = run_transfer(TransferConfig(
        data=args.data, out_dir=args.out_dir, backbone=args.backbone, layer=args.layer, views=args.views,
        blocks=tuple(args.blocks), epochs=args.epochs, full=not args.no_full, full_epochs=args.full_epochs,
        full_max_images=args.full_max_images, extract_args=tuple(args.extract_args),
        finetune_args=tuple(args.finetune_args), resamples=args.resamples))
    print(result["table"])
    print(f"table: {args.out_dir / 'transfer.md'}  results: {args.out_dir / 'transfer.json'}")


COMMANDS = [
    Command("finetune-images", "the reference: the whole backbone and a new head fine-tuned from the images, with the "
                               "same protocol as finetune", add_finetune_images, cmd_finetune_images),
    Command("transfer", "linear probe, probe on augmented views, partial fine-tuning from cache and the full "
                        "fine-tune loop on one data set: accuracy, time and memory in one table", add_transfer,
            cmd_transfer),
]
