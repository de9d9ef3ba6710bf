"""Fine-tuning on labelled shard sets: the linear probe and full fine-tuning, on one rank or
several; the report (metrics, kNN, diagnostics, plots) is hncl/evaluate/report.py's.

- linear: the frozen encoder's features (eval mode, no augmentation) are computed once, then a
  linear head is trained on them (the standard linear-evaluation protocol, and fast on a CPU).
- finetune: encoder + head trained end to end on augmented faces (random resized crop 0.8-1,
  flip, colour jitter, random erasing), the encoder at `encoder_lr_scale` x the head's lr; DDP
  when run on several ranks (Ray Train or torchrun), evaluation on rank 0.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2

from hncl.config import ConfigError, Protocol, Strategy, run_dir
from hncl.core import dist as hdist
from hncl.core.classifier import FERClassifier, build_classifier
from hncl.data.augment import MEAN, STD
from hncl.data.shards import ShardSet, iterate_forever, loader, train_pipeline
from hncl.data.sources import CLASSES
from hncl.evaluate.features import extract, predict_set
from hncl.evaluate.report import write_report
from hncl.train.engine import Engine, device_for


def fer_augment(size: int) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2)], p=0.5), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD), v2.RandomErasing(p=0.25, scale=(0.02, 0.2)),
    ])


def class_weights(shards: ShardSet, num_classes: int) -> torch.Tensor:
    counts = torch.tensor([float(shards.manifest["class_counts"].get(c, 0)) for c in CLASSES[:num_classes]])
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def train_linear(train: dict, test: dict, num_classes: int, cfg, weights: Optional[torch.Tensor]):
    """Logistic regression on frozen features (mini-batch SGD, cosine lr), stepped by the
    engine in this process alone. Returns the head and per-epoch history."""
    ft = cfg.finetune
    torch.manual_seed(0)
    x, y = torch.from_numpy(train["feats"]), torch.from_numpy(train["label"])
    keep = y >= 0
    x, y = x[keep], y[keep]
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardised features: one lr fits every encoder
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=ft.lr, momentum=0.9, weight_decay=ft.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(y) / ft.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ft.epochs * steps_per_epoch)
    engine = Engine(cfg.dist, head, opt, sched, torch.device("cpu"), alone=True)
    xt = torch.from_numpy(test["feats"])
    history = []
    for epoch in range(ft.epochs):
        perm = torch.randperm(len(y))
        total = 0.0
        for i in range(0, len(y), ft.batch_size):
            idx = perm[i:i + ft.batch_size]
            loss = F.cross_entropy(head((x[idx] - mean) / std), y[idx], weight=weights,
                                   label_smoothing=ft.label_smoothing)
            engine.step(loss)
            total += loss.item() * len(idx)
        with torch.no_grad():
            acc = float((head((xt - mean) / std).argmax(1).numpy() == test["label"]).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / len(y), "test_accuracy": acc})
    # fold the standardisation into the head so the classifier takes raw features
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_((head.weight * mean).sum(1))
    return head, history


def finetune_loop(config: dict) -> dict:
    """Entry of every rank (Ray Train worker, torchrun process or debug mode)."""
    from hncl.train.loop import init_local_process_group, typed_config

    cfg = typed_config(config["cfg"])
    if config.get("session") != "ray":
        init_local_process_group()
    with hdist.torch_threads(cfg.dist.cpus_per_worker):
        return _finetune_run(cfg)


def _finetune_run(cfg) -> dict:
    ft = cfg.finetune
    rank, world = hdist.rank(), hdist.world_size()
    device = device_for(cfg.dist)
    for key in ("train_shards", "test_shards"):
        if not ft[key]:
            raise ConfigError(f"config error: finetune.{key} is not set (a labelled shard set)")
    train_set, test_set = ShardSet.open(ft.train_shards), ShardSet.open(ft.test_shards)
    folder = run_dir(cfg)
    torch.manual_seed(cfg.run.seed)
    model, spec = build_classifier(ft.init, cfg.model, ft.num_classes, cfg.data.image_size)
    model.to(device)
    size = cfg.data.image_size
    weights = class_weights(train_set, ft.num_classes).to(device) if ft.class_balanced else None
    protocol = Protocol(ft.protocol)
    t0 = time.time()
    history: List[dict] = []
    if protocol is Protocol.linear:
        if rank == 0:
            tr = extract(train_set, model.encoder, size, device, workers=cfg.data.loader_workers)
            te = extract(test_set, model.encoder, size, device, workers=cfg.data.loader_workers)
            head, history = train_linear(tr, te, ft.num_classes, cfg, None if weights is None else weights.cpu())
            model.head.load_state_dict(head.state_dict())
    else:
        history = _finetune(model, cfg, train_set, test_set, device, weights, rank, world)
    result = {}
    if rank == 0:
        result = write_report(model, spec, cfg, train_set, test_set, device, folder, history, protocol.value,
                              seconds=time.time() - t0)
    if hdist.is_distributed():
        dist.barrier()
    return result


def _finetune(model: FERClassifier, cfg, train_set, test_set, device, weights, rank: int, world: int) -> List[dict]:
    ft = cfg.finetune
    labelled = sum(train_set.manifest["class_counts"].values())
    steps_per_epoch = max(1, labelled // (ft.batch_size * world))
    scale = ft.batch_size * world / 256
    encoder_lr = ft.lr * scale * ft.encoder_lr_scale
    if ft.layer_decay is None:
        encoder_groups = [{"params": model.encoder.parameters(), "lr": encoder_lr}]
    else:  # a timm encoder by depth: the last block at encoder_lr, each one below layer_decay x that
        from hncl.train.optim import layer_decay_groups

        encoder_groups = layer_decay_groups(model.encoder, ft.weight_decay, ft.layer_decay, encoder_lr)
    # the head stays the last group (its lr is reported)
    opt = torch.optim.SGD([*encoder_groups, {"params": model.head.parameters(), "lr": ft.lr * scale}],
                          momentum=0.9, nesterov=True, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ft.epochs * steps_per_epoch)
    engine = Engine(cfg.dist, model, opt, sched, device, strategy=Strategy.ddp)  # DDP over the ranks, if several
    pipeline = train_pipeline(train_set, ft.batch_size, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                              loader_workers=cfg.data.loader_workers,
                              view_transform=fer_augment(cfg.data.image_size), views=1, rank=rank, world=world)
    batches = iterate_forever(loader(pipeline, cfg.data.loader_workers))
    history = []
    for epoch in range(ft.epochs):
        model.train()
        total, seen, correct = 0.0, 0, 0
        for _ in range(steps_per_epoch):
            batch = next(batches)
            x, y = engine.inputs(batch["x1"].to(device)), batch["label"].to(device)
            logits = engine.module(x)
            loss = F.cross_entropy(logits, y, weight=weights, ignore_index=-1, label_smoothing=ft.label_smoothing)
            engine.step(loss)
            total += loss.item() * len(y)
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
        record = {"epoch": epoch + 1, "train_loss": total / seen, "train_accuracy": correct / seen,
                  "lr": opt.param_groups[-1]["lr"]}
        if rank == 0:
            te = predict_set(model, test_set, cfg.data.image_size, device, cfg.data.loader_workers)
            record["test_accuracy"] = float((te["pred"] == te["label"]).mean())
            print(f"[hncl] finetune epoch {epoch + 1}: loss {record['train_loss']:.3f} "
                  f"test accuracy {record['test_accuracy']:.3f}", flush=True)
        if hdist.is_distributed():
            dist.barrier()
        history.append(record)
    return history
