"""What a command needs, checked once in the driver before any worker starts.

A missing shard set or weights file found here is one line naming the config field; found
inside a Ray worker, it would be a traceback per worker and per retry (Ray restarts failed
workers up to dist.max_failures times).
"""

from __future__ import annotations

import os
from typing import Optional

from hncl import storage
from hncl.config import ConfigError, run_dir
from hncl.errors import InputError


def _where_hint(url: str) -> str:
    # `ray job submit --working-dir` runs the driver in the uploaded copy of the folder, which
    # leaves out .gitignored paths such as shards/ and runs/
    if not storage.is_remote(url) and "runtime_resources" in os.getcwd():
        return (" (relative paths resolve against the job's uploaded working directory, which leaves out "
                ".gitignored folders: pass an absolute path every node can read, or an s3:// URL)")
    return ""


def shard_set(url: Optional[str], field: str, what: str = "a shard set from hncl make-shards"):
    from hncl.data.shards import ShardSet

    if not url:
        raise ConfigError(f"config error: {field} is not set ({what})")
    try:
        return ShardSet.open(url)
    except InputError as e:
        raise InputError(f"{field}: {e}{_where_hint(url)}") from None


def weights_file(path: Optional[str], field: str) -> None:
    if path and path != "none" and not storage.exists(path):
        raise InputError(f"{field}: weights file not found: {path}{_where_hint(path)}")


def pretrain(cfg) -> None:
    shard_set(cfg.data.train_shards, "data.train_shards")
    weights_file(cfg.model.init_weights, "model.init_weights")


def finetune(cfg) -> None:
    ft = cfg.finetune
    shard_set(ft.train_shards, "finetune.train_shards", "a labelled shard set")
    shard_set(ft.test_shards, "finetune.test_shards", "a labelled shard set")
    weights_file(ft.init, "finetune.init")


def evaluate(cfg) -> None:
    ft = cfg.finetune
    if not ft.checkpoint:
        raise ConfigError("config error: finetune.checkpoint is not set (a folder with classifier.safetensors "
                          "from hncl finetune)")
    shard_set(ft.train_shards, "finetune.train_shards", "a labelled shard set, for the kNN evaluation")
    shard_set(ft.test_shards, "finetune.test_shards", "a labelled shard set")


def own_run_dir(cfg, command: str) -> None:
    """finetune / evaluate write metrics, plots and a classifier: never into a pretraining
    run's folder (or, for evaluate, into the folder of the classifier it evaluates)."""
    folder = run_dir(cfg)
    names = storage.listdir(folder)
    if "encoder.json" in names or any(n.startswith("checkpoint_") for n in names):
        raise ConfigError(f"config error: run.name={cfg.run.name}: {folder} holds a pretraining run; {command} "
                          f"would write into it. Choose another run.name")
    ckpt = cfg.finetune.checkpoint
    if command == "evaluate" and ckpt and os.path.normpath(ckpt) == os.path.normpath(folder):
        raise ConfigError(f"config error: run.name={cfg.run.name}: evaluate would write into the classifier's own "
                          f"folder {ckpt}. Choose another run.name")


def cluster_storage(cfg, inputs=()) -> None:
    """On a Ray cluster of several nodes, before any worker starts: every alive node sees
    run.output_dir and every input in `inputs` (config fields naming a shard set or a file) as
    this driver does (hncl.raycluster.require_visible). Ray itself notices a run directory on an
    unshared disk only at the first checkpoint upload, after retries; a run without checkpoints
    not at all."""
    from hncl.raycluster import require_visible

    locations = [("run.output_dir", cfg.run.output_dir, "output")]
    for field in inputs:
        section, name = field.split(".")
        url = cfg[section][name]
        if url and url != "none":
            locations.append((field, storage.join(url, "manifest.json") if field.endswith("_shards") else url, "input"))
    require_visible(locations)
