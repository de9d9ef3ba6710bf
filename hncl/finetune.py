"""Fine-tuning and evaluation on labelled shard sets: linear probe, full fine-tuning, kNN, and
heatmap-neighbour diagnostics. Writes metrics.json, confusion_matrix.png and curves into the
run directory.

- linear: the frozen encoder's features (eval mode, no augmentation) are computed once, then a
  linear head is trained on them (the standard linear-evaluation protocol, and fast on a CPU).
- finetune: encoder + head trained end to end on augmented faces (random resized crop 0.8-1,
  flip, colour jitter, random erasing), the encoder at `encoder_lr_scale` x the head's lr; DDP
  when run on several ranks (Ray Train or torchrun), evaluation on rank 0.
- kNN: cosine kNN of frozen features with faiss, weighted vote exp(cos / T).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import v2

from hncl import dist as hdist
from hncl import storage, tempfiles
from hncl.classifier import FERClassifier, build_classifier, load_classifier, preprocess, save_classifier
from hncl.config import ConfigError, run_dir, value
from hncl.data.augment import MEAN, STD
from hncl.data.shards import ShardSet, eval_pipeline, iterate_forever, loader, train_pipeline
from hncl.data.sources import CLASSES
from hncl.evaluate import knn
from hncl.evaluate.metrics import classification_report, confusion_matrix
from hncl.evaluate.plots import confusion_png, curves_png, neighbour_grid_png
from hncl.train.engine import Engine, device_for


@torch.no_grad()
def extract(shards: ShardSet, encoder: Optional[torch.nn.Module], image_size: int, device, batch_size: int = 128,
            keep_images: int = 0, workers: int = 2) -> Dict[str, np.ndarray]:
    """One exact pass: encoder features, labels, ids, heatmaps (and the first `keep_images` faces)."""
    out: Dict[str, list] = {"feats": [], "label": [], "id": [], "heatmap": [], "images": []}
    kept = 0
    if encoder is not None:
        encoder.eval()
    for batch in loader(eval_pipeline(shards, batch_size), num_workers=workers):
        if encoder is not None:
            out["feats"].append(encoder(preprocess(batch["image"].to(device), image_size)).float().cpu())
        out["label"].append(batch["label"])
        out["id"].append(batch["id"])
        out["heatmap"].append(batch["heatmap"])
        if kept < keep_images:
            imgs = batch["image"][: keep_images - kept].permute(0, 2, 3, 1)
            out["images"].append(imgs)
            kept += len(imgs)
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


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
    engine = Engine(cfg, head, opt, sched, torch.device("cpu"), strategy="local")
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
    device = device_for(cfg)
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
    protocol = value(ft.protocol)
    t0 = time.time()
    history: List[dict] = []
    if protocol == "linear":
        if rank == 0:
            tr = extract(train_set, model.encoder, size, device, workers=cfg.data.loader_workers)
            te = extract(test_set, model.encoder, size, device, workers=cfg.data.loader_workers)
            head, history = train_linear(tr, te, ft.num_classes, cfg, None if weights is None else weights.cpu())
            model.head.load_state_dict(head.state_dict())
    else:
        history = _finetune(model, cfg, train_set, test_set, device, weights, rank, world)
    result = {}
    if rank == 0:
        result = write_report(model, spec, cfg, train_set, test_set, device, folder, history, protocol,
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
    engine = Engine(cfg, model, opt, sched, device, strategy="ddp")  # DDP over the ranks, if several
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


@torch.no_grad()
def predict_set(model: FERClassifier, shards: ShardSet, image_size: int, device, workers: int = 2) -> Dict[str, np.ndarray]:
    model.eval()
    preds, labels, probs = [], [], []
    for batch in loader(eval_pipeline(shards, 128), num_workers=workers):
        logits = model(preprocess(batch["image"].to(device), image_size))
        probs.append(logits.softmax(1).cpu())
        preds.append(logits.argmax(1).cpu())
        labels.append(batch["label"])
    return {"pred": torch.cat(preds).numpy(), "label": torch.cat(labels).numpy(), "prob": torch.cat(probs).numpy()}


def neighbour_diagnostics(test: dict, descriptor, classes: List[str], folder: str, k: int = 5,
                          grid_rows: int = 6, kind: str = "flat") -> dict:
    """Purity of heatmap vs embedding nearest neighbours vs chance on a labelled set, and a PNG
    grid of query faces with their top heatmap neighbours."""
    labels = test["label"]
    mask = labels >= 0
    desc = descriptor(torch.from_numpy(test["heatmap"])).numpy()
    out = {"chance": knn.chance_purity(labels[mask]),
           "heatmap_k1": knn.neighbour_purity(desc[mask], labels[mask], 1, kind),
           f"heatmap_k{k}": knn.neighbour_purity(desc[mask], labels[mask], k, kind)}
    if "feats" in test:
        out["embedding_k1"] = knn.neighbour_purity(test["feats"][mask], labels[mask], 1, kind)
        out[f"embedding_k{k}"] = knn.neighbour_purity(test["feats"][mask], labels[mask], k, kind)
    if "images" in test and len(test["images"]) > grid_rows:
        n = len(test["images"])
        queries = np.linspace(0, n - 1, grid_rows).astype(int)  # spread over the kept faces
        _, idx = knn.search(desc[:n], desc[queries], k + 1)
        neighbours = np.array([[j for j in row if j != q][:k] for q, row in zip(queries, idx)])
        # the grid shows image r as row r's query: put the queries first
        images = np.concatenate([test["images"][queries], test["images"]])
        lab = np.concatenate([labels[queries], labels[:n]])
        rows = neighbours + grid_rows
        neighbour_grid_png(images, lab, rows, classes, os.path.join(folder, "neighbour_grid.png"))
    return out


def write_report(model: FERClassifier, spec: dict, cfg, train_set, test_set, device, folder: str,
                 history: List[dict], protocol: str, seconds: float = 0.0) -> dict:
    """Classifier metrics, kNN and neighbour diagnostics -> metrics.json + PNGs in `folder` (local or a URL)."""
    ft = cfg.finetune
    classes = list(CLASSES[:ft.num_classes])
    remote = storage.is_remote(folder)
    local = tempfiles.mkdtemp("report") if remote else folder
    os.makedirs(local, exist_ok=True)
    size = cfg.data.image_size
    te_pred = predict_set(model, test_set, size, device, cfg.data.loader_workers)
    mask = te_pred["label"] >= 0
    cm = confusion_matrix(te_pred["label"][mask], te_pred["pred"][mask], ft.num_classes)
    report = classification_report(cm, classes)
    tr = extract(train_set, model.encoder, size, device, workers=cfg.data.loader_workers)
    te = extract(test_set, model.encoder, size, device, keep_images=256, workers=cfg.data.loader_workers)
    tmask = tr["label"] >= 0
    knn_pred = knn.knn_predict(tr["feats"][tmask], tr["label"][tmask], te["feats"][mask], ft.num_classes,
                               ft.knn_k, ft.knn_temperature, value(ft.knn_index))
    knn_cm = confusion_matrix(te["label"][mask], knn_pred, ft.num_classes)
    report.update({
        "protocol": protocol, "init": ft.init, "encoder": spec, "train_shards": ft.train_shards,
        "test_shards": ft.test_shards, "knn": {"k": ft.knn_k, "temperature": ft.knn_temperature,
                                                **{k: v for k, v in classification_report(knn_cm, classes).items()
                                                   if k in ("accuracy", "mean_class_accuracy", "macro_f1")}},
        "neighbours": neighbour_diagnostics(te, test_set.descriptor(), classes, local, kind=value(ft.knn_index)),
        "history": history, "seconds": seconds,
    })
    confusion_png(cm, classes, os.path.join(local, "confusion_matrix.png"),
                  f"{protocol}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    if history:
        curves_png(history, [k for k in ("train_loss", "test_accuracy") if k in history[0]],
                   os.path.join(local, "curves.png"), protocol)
    save_classifier(model, local, spec, classes, size)
    with open(os.path.join(local, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1)
    if remote:
        storage.upload_dir(local, folder)
        shutil.rmtree(local, ignore_errors=True)
    print(f"[hncl] {protocol}: accuracy {report['accuracy']:.3f}  mean class accuracy "
          f"{report['mean_class_accuracy']:.3f}  macro-F1 {report['macro_f1']:.3f}  kNN {report['knn']['accuracy']:.3f}"
          f"  -> {folder}", flush=True)
    return report


def evaluate(cfg) -> dict:
    """`hncl evaluate`: a saved classifier (finetune.checkpoint) on finetune.test_shards, with kNN
    against finetune.train_shards and the neighbour diagnostics."""
    ft = cfg.finetune
    if not ft.checkpoint or not ft.test_shards or not ft.train_shards:
        raise ConfigError("config error: evaluate needs finetune.checkpoint, finetune.train_shards and "
                         "finetune.test_shards")
    model, meta = load_classifier(ft.checkpoint)
    spec = {k: meta[k] for k in ("arch", "width", "stem")}
    return write_report(model, spec, cfg, ShardSet.open(ft.train_shards), ShardSet.open(ft.test_shards),
                        torch.device("cpu"), run_dir(cfg), [], "evaluate")
