"""What a command needs, checked once in the driver before any worker starts.

A missing shard set or weights file found here is one line naming the config field; found
inside a Ray worker, it would be a traceback per worker and per retry (Ray restarts failed
workers up to dist.max_failures times).
"""

from __future__ import annotations

import os
from typing import Optional

from hncl.config import ConfigError, Stem, check_ranks, run_dir, world_size
from hncl.errors import InputError
from hncl.infra import storage


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


def encoder(spec: dict, size: int, weights: Optional[str], field: str) -> None:
    """The encoder is built once here and takes a data.image_size image (an IResNet's embedding,
    a ViT's patches, a convnet's strides), and the weights file, if any, is read into it: a
    misfit, a file that is no state dict, or one for another arch or width is refused before
    the run directory exists."""
    from hncl.core.backbones import build_encoder, check_image_size
    from hncl.core.model import WeightsError, load_encoder_weights

    arch = spec["arch"]
    try:
        built = build_encoder(arch, spec["width"], spec["stem"], size)
    except ValueError as e:  # e.g. an IResNet's embedding needs a size divisible by 16
        raise ConfigError(f"config error: data.image_size={size}: model.arch={arch}: {e}") from None
    why = check_image_size(built, size)
    if why:
        raise ConfigError(f"config error: data.image_size={size}: model.arch={arch}: {why}")
    if not weights or weights == "none" or storage.is_remote(weights):
        return
    try:
        load_encoder_weights(built, weights)
    except WeightsError as e:
        raise InputError(f"{field}: {e}") from None


def output_dir(cfg) -> None:
    """The run directory can be made where run.output_dir says (local paths; S3 is checked by
    the first write): no file in the way, the nearest existing folder writable."""
    folder = run_dir(cfg)
    if storage.is_remote(folder):
        return
    path = folder
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"config error: run.output_dir={cfg.run.output_dir!r}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"config error: run.output_dir={cfg.run.output_dir!r}: {path} is not writable")


def descriptor_matches(cfg, shards) -> None:
    """Each descriptor.* the config sets is the shard set's: the descriptor was fitted when the set
    was built, and a run cannot use another one (it used to replace the config's silently)."""
    spec = shards.manifest.get("descriptor") or shards.descriptor().spec()
    options = {"resolution": "--resolution", "inner_only": "--all-points", "dim": "--descriptor-dim"}
    for key, option in options.items():
        want, have = cfg.descriptor[key], spec[key]
        if want is not None and want != have:
            have = str(have).lower() if isinstance(have, bool) else have  # as YAML writes it
            raise ConfigError(f"config error: descriptor.{key}={want!r}: the shard set {shards.root} was built with "
                              f"{key}={have} (hncl make-shards {option}); set descriptor.{key}={have} or null "
                              f"(the set's), or build the set again")
    if cfg.descriptor.whiten:  # within the set's components, and the set keeps their variances (else no extra read)
        run_descriptor(cfg, shards)


def run_descriptor(cfg, shards):
    """The descriptor a run searches heatmap neighbours with: the set's, whitened in its first
    descriptor.whiten components when that is set."""
    descriptor = shards.descriptor()
    if not cfg.descriptor.whiten:
        return descriptor
    try:
        return descriptor.whitened(cfg.descriptor.whiten)
    except ValueError as e:
        raise ConfigError(f"config error: descriptor.whiten={cfg.descriptor.whiten}: {e} ({shards.root})") from None


def ranks(cfg, debug: bool) -> tuple:
    """(ranks, where that number comes from) of `hncl pretrain`: one process (or one rank per
    torchrun process) with --debug, else dist.num_workers Ray Train workers."""
    ranks_, source = world_size(cfg)
    if debug and source == "dist.num_workers":  # not under torchrun: this process alone
        return 1, "--debug: one process"
    return ranks_, source


def pretrain(cfg, debug: bool = False) -> None:
    """Before anything is written: the inputs exist, and the settings derived from them and from
    the run's real number of ranks can be honoured."""
    shards = shard_set(cfg.data.train_shards, "data.train_shards")
    descriptor_matches(cfg, shards)
    check_ranks(cfg, *ranks(cfg, debug))
    weights_file(cfg.model.init_weights, "model.init_weights")
    encoder({"arch": str(cfg.model.arch), "width": cfg.model.width, "stem": Stem(cfg.model.stem).value},
            cfg.data.image_size, cfg.model.init_weights, "model.init_weights")
    output_dir(cfg)


def knn_fits(cfg, train) -> None:
    # the kNN vote takes its neighbours from the train set: more than it holds would be cut
    k, n = cfg.finetune.knn_k, train.num_samples
    if k > n:
        raise ConfigError(f"config error: finetune.knn_k={k}: must be <= the {n} samples of finetune.train_shards "
                          f"({train.root})")


def finetune(cfg) -> None:
    ft = cfg.finetune
    knn_fits(cfg, shard_set(ft.train_shards, "finetune.train_shards", "a labelled shard set"))
    shard_set(ft.test_shards, "finetune.test_shards", "a labelled shard set")
    weights_file(ft.init, "finetune.init")
    from hncl.core.classifier import encoder_spec

    # the encoder a pretraining run's encoder.json names, else the config's
    encoder(encoder_spec(ft.init, cfg.model), cfg.data.image_size, ft.init, "finetune.init")
    output_dir(cfg)


def evaluate(cfg) -> None:
    ft = cfg.finetune
    if not ft.checkpoint:
        raise ConfigError("config error: finetune.checkpoint is not set (a folder with classifier.safetensors "
                          "from hncl finetune)")
    knn_fits(cfg, shard_set(ft.train_shards, "finetune.train_shards", "a labelled shard set, for the kNN evaluation"))
    shard_set(ft.test_shards, "finetune.test_shards", "a labelled shard set")
    output_dir(cfg)


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
    this driver does (hncl.infra.raycluster.require_visible). Ray itself notices a run directory on an
    unshared disk only at the first checkpoint upload, after retries; a run without checkpoints
    not at all."""
    from hncl.infra.raycluster import require_visible

    locations = [("run.output_dir", cfg.run.output_dir, "output")]
    for field in inputs:
        section, name = field.split(".")
        url = cfg[section][name]
        if url and url != "none":
            locations.append((field, storage.join(url, "manifest.json") if field.endswith("_shards") else url, "input"))
    require_visible(locations)
