"""Partial fine-tuning on cached activations: the backbone after the kept block (`pipeline.backbones.top`), rebuilt
from the same weights, and a new linear head, trained together on the activations a store keeps
(`extract --layer BLOCK --keep-spatial`), so the trunk below that block never runs again.

The protocol is the probe's (`pipeline.evaluation.probes.protocol_splits`): train on train, choose on validation,
test once. Training is AdamW with a cosine schedule (block and head each at their own learning rate), label smoothing
optional, and early stopping on validation loss: the best epoch's weights are kept (as Keras' `save_best_only`)
and the run stops after `patience` epochs without improvement. BatchNorm statistics and dropout stay as in
inference (the statistics of the pretrained backbone, not of a few small batches). The frozen blocks of the top are
run once per row and their output cached when it fits in `max_memory`; otherwise it is recomputed per batch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import FinetuneConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluation.metrics import classification_metrics, predicted
from pipeline.evaluation.probes import correctness, image_splits, train_rows
from pipeline.store.read import FeatureSet
from pipeline.store.spatial import SpatialReader

log = logging.getLogger(__name__)


class Inputs:
    """The top's input for rows of the store: the activations after the frozen blocks, cached when they fit."""

    def __init__(self, reader: SpatialReader, top: torch.nn.Module, start: int, rows: np.ndarray, *,
                 device: torch.device, max_memory: int, batch: int = 64) -> None:
        self.reader, self.top, self.start, self.device = reader, top, start, device
        self.cache: dict[int, int] | None = None
        self.tensor: torch.Tensor | None = None
        if len(rows) * int(np.prod(reader.shape)) * 4 * 2 <= max_memory:  # activations + frozen output, float32
            rows = np.unique(rows)
            parts = [self._frozen(reader.read(rows[i:i + batch])) for i in range(0, len(rows), batch)]
            self.tensor = torch.cat(parts).cpu()
            self.cache = {int(r): i for i, r in enumerate(rows)}

    def _frozen(self, activations: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.top.run_blocks(torch.from_numpy(activations).to(self.device), 0, self.start)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        if self.cache is not None:
            return self.tensor[[self.cache[int(r)] for r in rows]].to(self.device)
        return self._frozen(self.reader.read(rows))


def _trainable(top: torch.nn.Module, blocks: int) -> list[torch.nn.Parameter]:
    """Freeze the top, then unfreeze its last `blocks` blocks and (with any block) its tail."""
    top.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    if blocks:
        for module in [*list(top.blocks)[top.frozen_prefix(blocks):], *top.tail]:
            module.requires_grad_(True)
            params += list(module.parameters())
    return params


def _evaluate(top, head, inputs: Inputs, rows: np.ndarray, y: np.ndarray, *, start: int, batch: int,
              loss_fn) -> tuple[float, np.ndarray]:
    """(mean loss, logits [n, classes]) of rows, in eval mode without gradients."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            outs.append(head(top(inputs.get(rows[i:i + batch]), start)).float().cpu())
    logits = torch.cat(outs)
    return float(loss_fn(logits, torch.from_numpy(y))), logits.numpy()


class _Trainer:
    """One fine-tuning run's moving parts: the top and head on their device, the optimiser and its schedule, the
    inputs, and the row targets."""

    def __init__(self, fs: FeatureSet, top: torch.nn.Module, reader: SpatialReader, config: FinetuneConfig,
                 device: torch.device, rows: np.ndarray, classes: np.ndarray) -> None:
        self.config, self.device = config, device
        index = {int(c): i for i, c in enumerate(classes)}
        self.target = np.array([index.get(int(v), -1) for v in fs.labels], dtype=np.int64)
        torch.manual_seed(config.seed)
        self.top = top.to(device).eval()
        self.start = top.frozen_prefix(config.blocks)
        self.params = _trainable(top, config.blocks)
        self.head = torch.nn.Linear(fs.features.shape[1], len(classes)).to(device)
        self.inputs = Inputs(reader, top, self.start, rows, device=device, max_memory=config.max_memory,
                             batch=config.batch_size)
        groups = [{"params": list(self.head.parameters()), "lr": config.lr_head}]
        if self.params:
            groups.append({"params": self.params, "lr": config.lr_block})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.eval_loss = torch.nn.CrossEntropyLoss()

    def evaluate(self, rows: np.ndarray) -> tuple[float, np.ndarray]:
        return _evaluate(self.top, self.head, self.inputs, rows, self.target[rows], start=self.start,
                         batch=self.config.batch_size, loss_fn=self.eval_loss)

    def epoch(self, order: np.ndarray, schedule: Any) -> float:
        """One pass over `order`; the mean training loss."""
        total = 0.0
        for i in range(0, len(order), self.config.batch_size):
            rows = order[i:i + self.config.batch_size]
            logits = self.head(self.top(self.inputs.get(rows), self.start))
            loss = self.loss_fn(logits, torch.from_numpy(self.target[rows]).to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        return total / max(1, len(order))

    def fit(self, fit_rows: np.ndarray, val: np.ndarray) -> tuple[list[dict[str, Any]], int]:
        """Train with early stopping; the history and the best epoch, whose weights are restored."""
        config = self.config
        steps = config.epochs * math.ceil(len(fit_rows) / config.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, steps))
        generator = np.random.default_rng(config.seed)
        history, best = [], None
        for epoch in range(1, config.epochs + 1):
            train_loss = self.epoch(fit_rows[generator.permutation(len(fit_rows))], schedule)
            val_loss, logits = self.evaluate(val)
            val_top1 = float(np.mean(logits.argmax(1) == self.target[val]))
            history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                            "val_top1": val_top1})
            log.info("epoch %d: train loss %.4f, val loss %.4f, val top-1 %.4f", epoch, train_loss, val_loss,
                     val_top1)
            if best is None or val_loss < best["val_loss"]:
                best = {"epoch": epoch, "val_loss": val_loss, "state": _state(self.top, self.head, config.blocks)}
            elif epoch - best["epoch"] >= config.patience:
                break
        _restore(self.top, self.head, best["state"])
        return history, best["epoch"]


def train_top(fs: FeatureSet, top: torch.nn.Module, reader: SpatialReader, config: FinetuneConfig,
              device: torch.device) -> dict[str, Any]:
    """Train the last `config.blocks` blocks of `top` and a new head on the protocol's train rows with early
    stopping on validation; then score the test rows once with the best epoch's weights."""
    train, val, test, val_source = image_splits(fs, val_fraction=config.val_fraction, seed=config.seed)
    fit_rows = train_rows(fs, train, views=config.views)
    classes = np.unique(fs.labels[np.concatenate([train, val])])
    if not np.isin(fs.labels[test], classes).all():
        raise PipelineError("test classes have no train/val images; the model cannot predict them")
    began = time.perf_counter()
    trainer = _Trainer(fs, top, reader, config, device, np.concatenate([fit_rows, val, test]), classes)
    initial_loss, _ = trainer.evaluate(val)
    history, best = trainer.fit(fit_rows, val)
    _, test_logits = trainer.evaluate(test)
    scores = torch.softmax(torch.from_numpy(test_logits), 1).numpy()
    metrics = classification_metrics(fs.labels[test], scores, classes, fs.class_names, resamples=config.resamples,
                                     seed=config.seed)
    return {
        "protocol": f"partial fine-tuning: the last {config.blocks} block(s) after {reader.layer} and a new linear "
                    f"head trained on cached activations (AdamW, cosine schedule), early stopping on validation "
                    f"loss (patience {config.patience}), the best epoch kept, tested once",
        "head": "finetune", "param": "epoch", "chosen": best,
        "val_top1_by_value": {str(h["epoch"]): h["val_top1"] for h in history},
        "val_loss_by_value": {str(h["epoch"]): h["val_loss"] for h in history},
        "history": history, "initial_val_loss": round(initial_loss, 6), "epochs_run": len(history),
        "stopped_early": len(history) < config.epochs, "val_source": val_source, "n_train": int(len(fit_rows)),
        "n_val": int(len(val)), "n_test": int(len(test)), "n_train_views": int(len(fit_rows) - len(train)),
        "seconds": round(time.perf_counter() - began, 3), "blocks_trained": config.blocks,
        "top_blocks": len(top.blocks), "layer": reader.layer,
        "trainable_parameters": int(sum(p.numel() for p in [*trainer.params, *trainer.head.parameters()])),
        "activations_cached": trainer.inputs.cache is not None,
        **{f"test_{k}" if k != "n" else "n_test_scored": v for k, v in metrics.items()},
        "test_correct": correctness(fs, test, predicted(scores, classes)),
        "_model": (trainer.head, classes),
    }


def _state(top: torch.nn.Module, head: torch.nn.Module, blocks: int) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of everything trained: the top's state (its trained blocks change) and the head's."""
    return {"top": copy.deepcopy({k: v.detach().cpu() for k, v in top.state_dict().items()}) if blocks else {},
            "head": copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()})}


def _restore(top: torch.nn.Module, head: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    if state["top"]:
        top.load_state_dict(state["top"])
    head.load_state_dict(state["head"])


def run_finetune(config: FinetuneConfig) -> tuple[dict[str, Any], Path]:
    """Fine-tune from a store's kept activations; save the results JSON (a probe's shape: test top-1 under
    `test_top1`), the trained model (`NAME.finetune.safetensors`) and the report beside it. Outputs are checked
    before training and written once everything is computed."""
    from pipeline.engine.devices import resolve_device
    from pipeline.evaluation.finetune_model import build_for_store, model_bytes, model_outputs
    from pipeline.outputs import write_atomic
    from pipeline.report.blocks import report_blocks, save_json, title_for
    from pipeline.report.render import write_report_blocks
    from pipeline.store.read import load_store

    fs = load_store(config.store, views=True)
    made = fs.made
    if not made.spatial_layer:
        raise PipelineError(f"{config.store} holds no activations to fine-tune from; extract it with --layer BLOCK "
                            "--keep-spatial (e.g. --layer blocks.5 for efficientnet_lite0)")
    device = resolve_device(config.device)
    targets = model_outputs(config)
    model, top = build_for_store(made, device=device)
    if config.blocks > len(top.blocks):
        raise ConfigError(f"--blocks {config.blocks}: the network after {made.spatial_layer} has only "
                          f"{len(top.blocks)} block(s); extract with an earlier --layer to train more")
    with SpatialReader(config.store) as reader:
        if reader.shape != tuple(model.spatial_shape):
            raise PipelineError(f"{config.store} holds activations of shape {list(reader.shape)}, but "
                                f"{made.backbone} gives {list(model.spatial_shape)} after {made.spatial_layer}; the "
                                "store is damaged: extract it again")
        result = train_top(fs, top, reader, config, device)
    head, classes = result.pop("_model")
    result.update(fs.provenance(), model_file=str(targets["model"].resolve()))
    saved = model_bytes(model, top, head, classes, blocks=config.blocks, fs=fs, result=result)
    blocks = report_blocks(fs, title=title_for(fs), probe=result) if config.report else None
    write_atomic(targets["model"], saved)
    if blocks is not None:
        result["report"] = [str(p.resolve()) for p in write_report_blocks(targets["stem"], blocks)]
    save_json(targets["results"], {**result, "featpipe": {"kind": "finetune-results", "version": 1}})
    return result, targets["out"]
