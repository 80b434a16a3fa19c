"""The reference the cached fine-tuning is measured against: the seeds' full fine-tune loop from images. The whole
backbone and a new linear head are trained end to end from the image files (decoded every epoch, through the
model's training transform, BatchNorm in training mode), with the same protocol as `finetune` (the store's splits,
validation drawn from images, early stopping on validation loss, the best epoch kept, tested once). It re-runs the
trunk every epoch, which is what `finetune` avoids; it is for small data sets (`--max-images`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import FullFinetuneConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import classification_metrics, predicted
from pipeline.evaluation.probes import correctness, image_splits
from pipeline.store.read import FeatureSet

log = logging.getLogger(__name__)


def _batches(loop: _Loop, transform, rows: np.ndarray):
    from pipeline.engine.embed import transformed_files

    for i in range(0, len(rows), loop.config.batch_size):
        chunk = rows[i:i + loop.config.batch_size]
        images = transformed_files([loop.locators[int(r)] for r in chunk], transform, loop.decoding, loop.reader)[0]
        yield chunk, torch.stack(images).to(loop.device)


class _Loop:
    """The whole network and a head, trained from the images, read through the source's reader (files, tar
    members, dataset items)."""

    def __init__(self, fs: FeatureSet, config: FullFinetuneConfig, classes: np.ndarray) -> None:
        from pipeline.backbones.factory import training_transform
        from pipeline.engine.devices import resolve_device
        from pipeline.engine.embed import backbone_for
        from pipeline.engine.resolve import decoding_policy
        from pipeline.plan import DecodeSpec
        from pipeline.sources.lookup import source_for

        made = fs.made
        self.config, self.device = config, resolve_device(config.device)
        torch.manual_seed(config.seed)  # and the augmentations' random state (timm's transforms draw from `random`)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.backbone = backbone_for(made, device=str(self.device))
        self.net = self.backbone.model.requires_grad_(True)
        self.head = torch.nn.Linear(self.backbone.dim, len(classes)).to(self.device)
        self.train_transform = training_transform(self.backbone)
        self.decoding = decoding_policy(self.backbone.data_config, DecodeSpec(alpha=made.alpha))
        source = source_for(made)
        where = {s.id: k for k, s in enumerate(source.samples)}
        missing = [str(i) for i in fs.ids if str(i) not in where]
        if missing:
            raise PipelineError(f"{len(missing)} images of the store are no longer in its source (e.g. {missing[0]})")
        self.locators, self.reader = source.locators([where[str(i)] for i in fs.ids]), source.reader
        index = {int(c): k for k, c in enumerate(classes)}
        self.target = np.array([index.get(int(v), -1) for v in fs.labels], dtype=np.int64)
        self.optimizer = torch.optim.AdamW([{"params": self.net.parameters(), "lr": config.lr_block},
                                            {"params": self.head.parameters(), "lr": config.lr_head}],
                                           weight_decay=config.weight_decay)
        self.loss = torch.nn.CrossEntropyLoss()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.net.features(images.contiguous(memory_format=torch.channels_last)))

    def evaluate(self, rows: np.ndarray) -> tuple[float, np.ndarray]:
        self.net.eval()
        outs = []
        with torch.no_grad():
            for _, images in _batches(self, self.backbone.transform, rows):
                outs.append(self.logits(images).float().cpu())
        logits = torch.cat(outs)
        return float(self.loss(logits, torch.from_numpy(self.target[rows]))), logits.numpy()

    def epoch(self, order: np.ndarray, schedule: Any) -> float:
        self.net.train()
        total = 0.0
        for chunk, images in _batches(self, self.train_transform, order):
            loss = self.loss(self.logits(images), torch.from_numpy(self.target[chunk]).to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(chunk)
        return total / max(1, len(order))


def full_finetune(config: FullFinetuneConfig) -> dict[str, Any]:
    """Run the reference loop and write its results JSON (a probe's shape: test top-1 under `test_top1`)."""
    from pipeline.report.blocks import save_json
    from pipeline.store.read import load_store

    fs = load_store(config.store)
    if len(fs) > config.max_images:
        raise PipelineError(f"{config.store} has {len(fs)} images; the full fine-tune loop is a reference for at "
                            f"most {config.max_images} (raise --max-images, or use finetune on cached activations)")
    train, val, test, val_source = image_splits(fs, val_fraction=config.val_fraction, seed=config.seed)
    classes = np.unique(fs.labels[np.concatenate([train, val])])
    began = time.perf_counter()
    loop = _Loop(fs, config, classes)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        loop.optimizer, T_max=max(1, config.epochs * math.ceil(len(train) / config.batch_size)))
    generator = np.random.default_rng(config.seed)
    history, best = [], None
    for epoch in range(1, config.epochs + 1):
        train_loss = loop.epoch(train[generator.permutation(len(train))], schedule)
        val_loss, logits = loop.evaluate(val)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                        "val_top1": float(np.mean(logits.argmax(1) == loop.target[val]))})
        log.info("full fine-tune epoch %d: %s", epoch, history[-1])
        if best is None or val_loss < best[1]:
            best = (epoch, val_loss, {k: v.detach().clone() for k, v in
                                      {**loop.net.state_dict(), **{f"head.{k}": v for k, v in
                                                                   loop.head.state_dict().items()}}.items()})
        elif epoch - best[0] >= config.patience:
            break
    state = best[2]
    loop.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    loop.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    _, test_logits = loop.evaluate(test)
    scores = torch.softmax(torch.from_numpy(test_logits), 1).numpy()
    metrics = classification_metrics(fs.labels[test], scores, classes, fs.class_names, resamples=config.resamples,
                                     seed=config.seed)
    result = {"protocol": "full fine-tuning from images (every layer and a new linear head, AdamW, cosine "
                          "schedule, training transform every epoch), early stopping on validation loss, the best "
                          "epoch kept, tested once",
              "head": "full-finetune", "param": "epoch", "chosen": best[0], "history": history,
              "epochs_run": len(history), "val_source": val_source, "n_train": int(len(train)),
              "n_val": int(len(val)), "n_test": int(len(test)), "seconds": round(time.perf_counter() - began, 3),
              **{f"test_{k}" if k != "n" else "n_test_scored": v for k, v in metrics.items()},
              "test_correct": correctness(fs, test, predicted(scores, classes)), **fs.provenance()}
    save_json(config.out, {**result, "featpipe": {"kind": "full-finetune-results", "version": 1}})
    return result
