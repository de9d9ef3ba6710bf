"""The report of a classifier on a labelled set: accuracy, per-class metrics and confusion
matrix, kNN accuracy of its frozen features (faiss), heatmap- vs embedding-neighbour purity, and
the PNGs, into the run directory (local or S3); and `hncl evaluate`, which writes it for a saved
classifier."""

from __future__ import annotations

import json
import os
import shutil
from typing import List

import numpy as np
import torch
from omegaconf import OmegaConf

from hncl.config import ConfigError, KnnIndex, run_dir
from hncl.core.classifier import FERClassifier, load_classifier, save_classifier
from hncl.data.shards import ShardSet
from hncl.data.sources import CLASSES
from hncl.evaluate import knn
from hncl.evaluate.features import extract, predict_set
from hncl.evaluate.metrics import classification_report, confusion_matrix
from hncl.evaluate.plots import confusion_png, curves_png, neighbour_grid_png
from hncl.infra import storage, tempfiles


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
                               ft.knn_k, ft.knn_temperature, KnnIndex(ft.knn_index).value)
    knn_cm = confusion_matrix(te["label"][mask], knn_pred, ft.num_classes)
    report.update({
        "protocol": protocol, "init": ft.init, "encoder": spec, "train_shards": ft.train_shards,
        "test_shards": ft.test_shards, "knn": {"k": ft.knn_k, "temperature": ft.knn_temperature,
                                                **{k: v for k, v in classification_report(knn_cm, classes).items()
                                                   if k in ("accuracy", "mean_class_accuracy", "macro_f1")}},
        "neighbours": neighbour_diagnostics(te, test_set.descriptor(), classes, local,
                                            kind=KnnIndex(ft.knn_index).value),
        "history": history, "seconds": seconds,
    })
    confusion_png(cm, classes, os.path.join(local, "confusion_matrix.png"),
                  f"{protocol}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    if history:
        curves_png(history, [k for k in ("train_loss", "test_accuracy") if k in history[0]],
                   os.path.join(local, "curves.png"), protocol)
    save_classifier(model, local, spec, classes, size)
    with open(os.path.join(local, "config.yaml"), "w") as f:  # the resolved config, as every run directory has
        f.write(OmegaConf.to_yaml(cfg))
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
