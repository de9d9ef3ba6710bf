"""Typed configuration: every default lives here, in one place.

A run's config is these dataclasses, overlaid by a YAML file (``configs/*.yaml``), overlaid by
dotted command-line overrides (``data.batch_size=64``). OmegaConf checks types and enum values;
``validate`` checks ranges and cross-field rules. Every error names the offending field.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hncl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem, phrased for the user in one line that names the field."""


class Stem(str, enum.Enum):
    imagenet = "imagenet"  # torchvision's 7x7/2 conv + max-pool (for >= 112 px faces)
    small = "small"  # 3x3/1 conv, no pool (for tiny CPU images, e.g. 32-64 px)


class Dtype(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float64 = "float64"

    @property
    def torch(self):
        """The torch dtype (torch is imported only when asked: reading a config does not need it)."""
        import torch

        return getattr(torch, self.value)


class Strategy(str, enum.Enum):
    ddp = "ddp"
    deepspeed = "deepspeed"


class Placement(str, enum.Enum):
    """Ray placement-group strategies for the workers' bundles."""
    PACK = "PACK"  # as few nodes as possible (Ray Train's default)
    SPREAD = "SPREAD"  # over the nodes where possible
    STRICT_SPREAD = "STRICT_SPREAD"  # one worker per node, never two on one node
    STRICT_PACK = "STRICT_PACK"  # all workers on one node


class AugmentOn(str, enum.Enum):
    loader = "loader"  # torchvision, per image, in the loader workers
    device = "device"  # kornia, per batch, on the training device after the copy (GPU jobs)


class OptimizerName(str, enum.Enum):
    sgd = "sgd"
    adamw = "adamw"
    lars = "lars"


@dataclass
class ModelConfig:
    # resnet18, resnet50 (torchvision), iresnet18, iresnet50 (face recognition, insightface's
    # layout), or timm/NAME: any timm model (hncl.core.backbones); never downloaded: see init_weights
    arch: str = "resnet18"
    width: int = 64  # channels of the first stage; 64 = torchvision's ResNet, smaller for CPU tests
    stem: Stem = Stem.imagenet
    proj_layers: int = 3  # NNCLR projector: 3 linear layers with BatchNorm
    proj_hidden: int = 2048
    proj_out: int = 256
    pred_hidden: int = 4096  # NNCLR predictor: 2 linear layers
    init_weights: Optional[str] = None  # encoder weights in the arch's own layout (torchvision, insightface, timm)
    sync_bn: bool = False  # SyncBatchNorm across ranks (DDP only)


@dataclass
class MethodConfig:
    """What every method has. Each method declares its own options in a subclass of this, its
    `Method.Config` (hncl/core/methods/NAME.py); the method section takes that schema once
    method.name is known, so `method.topk` exists for nnclr and hncl and is refused for simclr."""

    name: str = "hncl"  # a module of hncl/core/methods: hncl, simclr (baseline), nnclr, supervised
    temperature: float = 0.1

    @staticmethod
    def validate(me: Any, check: Callable[[bool, str, Any, str], None]) -> None:
        """Range rules of this method's own options: check(ok, "method.KEY", value, rule)."""
        check(me.temperature > 0, "method.temperature", me.temperature, "must be > 0")


@dataclass(frozen=True)
class ShardSetDefaults:
    """`hncl make-shards`' build options: the one place their defaults live (its flags,
    make_shards() and the demo read them). A run's descriptor section names what it expects of
    the set it reads (DescriptorConfig)."""

    image_size: int = 112  # aligned face size in pixels
    resolution: int = 16  # R: heatmaps stored pooled to 68 x R x R (uint8)
    descriptor_dim: int = 64  # Dh after the PCA projection (as pure as 256: docs/HEATMAPS.md)
    inner_only: bool = True  # the descriptor drops the 17 jaw-line points (face shape = identity)
    shard_size: int = 1000  # rows per shard
    max_skip_fraction: float = 0.05  # a build fails above this fraction of skipped rows
    synthetic_samples: int = 1000  # --source synthetic without --num-samples
    synthetic_difficulty: str = "easy"  # --source synthetic: hncl.data.synthetic.DIFFICULTIES (the demo: realistic)


SHARD_SET = ShardSetDefaults()


@dataclass
class DescriptorConfig:
    # The heatmap descriptor is fitted once per shard set, when it is built (hncl make-shards
    # --resolution, --all-points, --descriptor-dim): a run uses the set's. null: whatever the set
    # has; a value: what the run expects of the set, refused when the set differs (never replaced).
    resolution: Optional[int] = None  # R of the stored heatmaps (ShardSetDefaults.resolution)
    inner_only: Optional[bool] = None  # the descriptor on the 51 inner points (ShardSetDefaults.inner_only)
    dim: Optional[int] = None  # Dh after the PCA projection (ShardSetDefaults.descriptor_dim)
    # How this run uses the set's descriptor (not a property of the set): 0 = as fitted; k > 0 = its
    # first k components scaled to unit variance (whitened), so head pose and face shape, the largest
    # directions of heatmap variation, stop outweighing expression in the neighbour search (#24)
    whiten: int = 0


@dataclass
class DataConfig:
    train_shards: Optional[str] = None  # local dir or s3:// URL of a shard set
    image_size: int = 112
    batch_size: int = 256  # per rank, at the run's first start (then: data.global_batch_size / ranks)
    loader_workers: int = 4
    shuffle_buffer: int = 2000  # each reader shuffles its share of an epoch in blocks of this many samples
    # the run's global batch, kept across resumes and split over the ranks there are (None: batch_size
    # x the ranks of the run's first start); the lr is scaled with it
    global_batch_size: Optional[int] = None
    # the schedule's epoch (optim.epochs, warmup_epochs) in global batches; None: one pass over the set
    steps_per_epoch: Optional[int] = None
    min_crop_scale: float = 0.6  # RandomResizedCrop lower bound: expressions must survive the crop
    colour: float = 0.4  # brightness/contrast jitter of the views (saturation 3/4 of it)
    hue: float = 0.0  # hue jitter of the views (0: off; 6x slower on CPU)
    grayscale: float = 0.2  # probability that a view is grey
    augment_on: AugmentOn = AugmentOn.loader  # where the two views are made (docs/PERFORMANCE.md)
    # stop when more than this fraction of the samples the stream should have delivered were lost
    # (corrupt samples, and every sample of a shard that could not be read: counted in samples)
    max_skip_fraction: float = 0.01
    stall_timeout_s: float = 600.0  # stop when no sample arrives for this long (S3 outage, hung reads)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.3  # for a global batch of 256; scaled linearly with the global batch
    scale_lr: bool = True  # lr * global_batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    epochs: int = 100
    grad_clip: Optional[float] = None
    # layer-wise lr decay of a timm encoder (ViT recipes): block i of L at lr x layer_decay^(L-1-i),
    # e.g. 0.75 when continuing from model.init_weights; null: one lr for every layer
    layer_decay: Optional[float] = None


@dataclass
class DistConfig:
    strategy: Strategy = Strategy.ddp
    num_workers: int = 1  # Ray Train workers (= ranks)
    use_gpu: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0, 1, 2)
    precision: Dtype = Dtype.float32  # bfloat16/float16 = mixed precision on GPU
    max_failures: int = 2  # Ray restarts the workers from the last checkpoint this often
    cpus_per_worker: int = 1
    placement: Placement = Placement.PACK  # STRICT_SPREAD: one worker per node
    # How long Ray Train may wait for its workers' resources (a lost node to come back, a node to
    # join) before the run stops, naming what is missing and the last committed checkpoint.
    # Ray's own default is to wait forever.
    node_wait_s: float = 600.0


@dataclass
class RunConfig:
    name: str = "hncl"
    output_dir: str = "runs"  # local dir or s3:// URL
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    fail_at_step: Optional[int] = None  # fault injection for tests: rank `fail_rank` dies once at this step
    fail_rank: int = 1
    # write run_dir/sample_ids_rank{r}.json at the end: the (sample id, data epoch) of every sample
    # rank r trained on since it (re)started, to check how the stream was split (8 bytes a sample)
    record_sample_ids: bool = False


class Protocol(str, enum.Enum):
    linear = "linear"  # frozen encoder, linear head (linear probe)
    finetune = "finetune"  # encoder + linear head, encoder at a lower learning rate


class KnnIndex(str, enum.Enum):
    flat = "flat"  # exact inner-product search
    ivf = "ivf"  # inverted lists: approximate, for millions of samples


@dataclass
class FinetuneConfig:
    train_shards: Optional[str] = None  # labelled shard set
    test_shards: Optional[str] = None
    init: Optional[str] = None  # encoder.safetensors of a pretraining run, a torchvision ResNet state dict, or none
    protocol: Protocol = Protocol.linear
    num_classes: int = 7
    epochs: int = 30
    batch_size: int = 128  # per rank
    lr: float = 0.1  # head lr for a global batch of 256 (scaled linearly)
    encoder_lr_scale: float = 0.1  # finetune: encoder lr = lr * this
    layer_decay: Optional[float] = None  # finetune, timm encoders: layer-wise decay of the encoder's lr (e.g. 0.65)
    weight_decay: float = 1e-4
    class_balanced: bool = False  # inverse-frequency class weights (FER sets are imbalanced)
    label_smoothing: float = 0.0
    knn_k: int = 20
    knn_temperature: float = 0.07  # neighbour vote weight exp(cos / T)
    knn_index: KnnIndex = KnnIndex.flat
    checkpoint: Optional[str] = None  # evaluate: classifier.safetensors to evaluate


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _node_class(path: str) -> Any:
    """The dataclass type at dotted ``path`` of Config ('' = Config), or None."""
    cls: Any = Config
    for part in [p for p in path.split(".") if p]:
        cls = typing.get_type_hints(cls).get(part)
        if not is_dataclass(cls):
            return None
    return cls


def _unknown_key_message(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    cls = _node_class(parent)
    allowed = [f.name for f in fields(cls)] if cls is not None else []
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    where = f"'{parent}'" if parent else "the top level"
    msg = f"config error: unknown key '{full_key}'"
    if hint:
        msg += f" (did you mean '{(parent + '.') if parent else ''}{hint[0]}'?)"
    return msg + f"; keys allowed in {where}: {', '.join(allowed)}"


def _reraise(e: OmegaConfBaseException, source: str) -> None:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError) or "not in" in str(getattr(e, "msg", "")):
        raise ConfigError(_unknown_key_message(key) + f" [{source}]") from None
    text = str(getattr(e, "msg", None) or e).splitlines()[0]
    raise ConfigError(f"config error: {key or '?'}: {text} [{source}]") from None


# settings that were replaced: what to write instead (checked before the merge, which would only
# say "unknown key")
_RENAMED = {
    "method.nn_space": "method.nn_space was replaced by method.name: write method.name=hncl (for nn_space=heatmap), "
                       "method.name=nnclr (embedding) or method.name=simclr (none)",
    "run.reshard_queue": "run.reshard_queue was removed: a resume on another world size re-splits the queue (and the "
                         "stream, and a ZeRO optimiser) by itself; delete the setting",
    "method.view_weight": "method.view_weight was removed: method.name=hncl always trains on the two views, "
                          "method.name=nnclr never (exactly NNCLR); write method.name instead",
}


def _check_renamed(tree: Any, source: str) -> None:
    for key, message in _RENAMED.items():
        section, name = key.split(".")
        node = tree.get(section) if isinstance(tree, (dict, DictConfig)) else None
        if isinstance(node, (dict, DictConfig)) and name in node:
            raise ConfigError(f"config error: {message} [{source}]")


def _check_sections(tree: Any, source: str) -> None:
    """A config is a mapping of sections, each a mapping of settings: anything else would fail
    inside OmegaConf's merge, with a traceback or without the key."""
    if not isinstance(tree, DictConfig):
        raise ConfigError(f"config error: {source} must be a mapping of sections (model:, method:, data:, ...), "
                          f"not a {'list' if OmegaConf.is_list(tree) else type(tree).__name__}")
    for key in tree:
        node = tree._get_node(key)
        if _node_class(str(key)) is not None and not isinstance(node, DictConfig) and not node._is_none():
            raise ConfigError(f"config error: {key}={node._value()!r}: must be a section of settings "
                              f"({key}.NAME: value), not a single value [{source}]")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        _reraise(e, source)
        raise  # unreachable


# Every config field that names a local file or folder. Ray Train starts each worker in a
# directory of its own, so these are made absolute once, in the process that reads the config
# (the driver), before anything is sent to a worker; URLs (s3://...) stay as they are.
PATH_KEYS = ("model.init_weights", "data.train_shards", "run.output_dir",
             "finetune.train_shards", "finetune.test_shards", "finetune.init", "finetune.checkpoint")


def resolve_path(value: Optional[str], base: Optional[str] = None) -> Optional[str]:
    """A local path made absolute against `base` (default: the working directory, with ~
    expanded); URLs, None and the word 'none' unchanged."""
    if not value or value == "none" or "://" in value:
        return value
    return os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(value)))


def _in_ray_job_working_dir() -> bool:
    """True in the driver of `ray job submit --working-dir`: its working directory is a copy
    of the uploaded folder inside the head node's Ray session, deleted with the session."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def resolve_paths(cfg: DictConfig, base: Optional[str] = None) -> None:
    out = cfg.run.output_dir
    if out and "://" not in out and not os.path.isabs(os.path.expanduser(out)) and _in_ray_job_working_dir():
        raise ConfigError(f"config error: run.output_dir={out} is a relative path: under `ray job submit "
                          f"--working-dir` it would land in the job's temporary copy of the working directory "
                          f"on the head node. Set run.output_dir to s3://... or an absolute path on storage "
                          f"every node shares")
    for key in PATH_KEYS:
        section, name = key.split(".")
        cfg[section][name] = resolve_path(cfg[section][name], base)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML file <- dotted overrides, typed and validated, local paths absolute
    (resolved against the working directory: see PATH_KEYS)."""
    sources: List[Tuple[Any, str]] = []
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config error: file not found: {path}")
        try:
            sources.append((OmegaConf.load(path), path))
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"config error: cannot parse {path}: {str(e).splitlines()[0]}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"config error: override '{bad[0]}' is not of the form key=value")
    if overrides:
        try:
            sources.append((OmegaConf.from_dotlist(list(overrides)), "command line"))
        except OmegaConfBaseException as e:
            raise ConfigError(f"config error: cannot parse overrides: {e}") from None
    for tree, source in sources:
        _check_sections(tree, source)
        _check_renamed(tree, source)
    cfg = schema(sources)
    for tree, source in sources:
        _check_method_keys(tree, cfg.method, source)
        cfg = _merge(cfg, tree, source)
    resolve_paths(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def schema(sources: List[Tuple[Any, str]]) -> DictConfig:
    """The typed defaults for these sources ([(tree, where it came from)]): Config, its method
    section the Config of the method the sources name (the last one that sets method.name; else
    the default)."""
    from hncl.core.methods import METHODS, method_class

    name, source = MethodConfig.name, "the default"
    for tree, src in sources:
        node = tree.get("method")
        if isinstance(node, (dict, DictConfig)) and node.get("name") is not None:
            name, source = str(node["name"]), src
    _check(name in METHODS, "method.name", name, f"allowed values: {', '.join(METHODS)} [{source}]")
    cfg: DictConfig = OmegaConf.structured(Config)
    cfg.method = method_class(name).Config(name=name)
    return cfg


def typed(resolved: dict) -> DictConfig:
    """A resolved config sent as a plain dict (to a worker) typed and validated again."""
    cfg = OmegaConf.merge(schema([(resolved, "the resolved config")]), resolved)
    validate(cfg)
    return cfg  # type: ignore[return-value]


def _check_method_keys(tree: Any, schema: Any, source: str) -> None:
    """A key of the method section that the chosen method does not have: one line saying whose
    option it is (another method's: a config written for that method), or what is allowed."""
    from hncl.core.methods import METHODS, method_class

    node = tree.get("method")
    if not isinstance(node, DictConfig):
        return
    allowed = [f.name for f in fields(OmegaConf.get_type(schema))]
    for key in node:
        if key in allowed:
            continue
        owners = [n for n in METHODS if key in {f.name for f in fields(method_class(n).Config)}]
        if owners:
            raise ConfigError(f"config error: method.{key} is an option of {' and '.join(owners)}, not of "
                              f"method.name={schema.name} (its options: {', '.join(allowed)}): remove it, or set "
                              f"method.name={owners[0]} [{source}]")
        hint = difflib.get_close_matches(str(key), allowed, n=1)
        raise ConfigError(f"config error: unknown key 'method.{key}'" + (f" (did you mean 'method.{hint[0]}'?)" if hint else "")
                          + f"; keys allowed in 'method' for method.name={schema.name}: {', '.join(allowed)} [{source}]")


def _check(cond: bool, key: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"config error: {key}={value!r}: {rule}")


def _check_finite(cfg: DictConfig) -> None:
    """Every float setting is a finite number: `inf` passes `> 0` (a learning rate, a timeout)
    and `nan` fails every comparison with a message about the range, not the value."""
    for section in fields(Config):
        for key, x in cfg[section.name].items():  # the method section: the chosen method's options too
            if isinstance(x, float):
                _check(math.isfinite(x), f"{section.name}.{key}", x, "must be a finite number")


def _check_run_name(name: str) -> None:
    # run.name is one folder inside run.output_dir: '../x', 'a/b' or '/abs' would write elsewhere
    _check(bool(name) and name == name.strip() and name not in (".", "..") and "/" not in name and "\\" not in name
           and not any(ord(c) < 32 for c in name), "run.name", name,
           "must be one folder name inside run.output_dir: not empty, no '/' or '\\', not '.' or '..', no leading "
           "or trailing spaces")


def world_size(cfg: DictConfig) -> tuple:
    """(ranks, where that number comes from) for the run this process belongs to: torchrun's
    WORLD_SIZE when it started this process (`torchrun ... hncl.cli pretrain --debug`, one rank
    per process), else dist.num_workers (Ray Train's workers)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("WORLD_SIZE", "").isdigit() and \
            int(os.environ["WORLD_SIZE"]) >= 1:
        return int(os.environ["WORLD_SIZE"]), "torchrun's WORLD_SIZE"
    return int(cfg.dist.num_workers), "dist.num_workers"


def check_ranks(cfg: DictConfig, ranks: int, source: str, global_batch: Optional[int] = None) -> None:
    """Rules on values derived from the number of ranks the run is split over (`source` says
    where that number comes from). global_batch: the run's, when known (a resume keeps its
    checkpoint's); else data.global_batch_size, or data.batch_size x ranks."""
    me, d = cfg.method, cfg.data
    plural = "s" if ranks != 1 else ""
    _check("queue_size" not in me or me.queue_size % ranks == 0, "method.queue_size", me.get("queue_size"),
           f"must be divisible by the run's {ranks} rank{plural} ({source}): each rank holds Q/W slots")
    if d.global_batch_size is not None:
        _check(d.global_batch_size % ranks == 0, "data.global_batch_size", d.global_batch_size,
               f"must be divisible by the run's {ranks} rank{plural} ({source}): each rank takes an equal share")
    batch = global_batch or d.global_batch_size or d.batch_size * ranks
    how = "" if global_batch or d.global_batch_size else \
        f" (data.batch_size={d.batch_size} x {ranks} rank{plural}, {source})"
    # a face has batch - 1 others in the global batch: more neighbours cannot be found (they were cut)
    _check("batch_neighbours" not in me or me.batch_neighbours < batch, "method.batch_neighbours", me.get("batch_neighbours"),
           f"must be < the global batch of {batch} samples{how}: each face has only the others of its batch "
           f"as neighbours")
    # the fault would never fire on a rank the run does not have
    _check(cfg.run.fail_at_step is None or cfg.run.fail_rank < ranks, "run.fail_rank", cfg.run.fail_rank,
           f"must be < the run's {ranks} rank{plural} ({source}) when run.fail_at_step is set")


def validate(cfg: DictConfig) -> None:
    """Range and cross-field rules OmegaConf's types cannot express, for every field where a range
    is obvious (enums and booleans are checked by OmegaConf; paths may name anything). Each
    refusal is one line naming the field (`config error: key=value: rule`)."""
    _check_finite(cfg)
    m, me, d = cfg.model, cfg.method, cfg.descriptor
    # model (stem: an enum; init_weights: a path; sync_bn: below)
    from hncl.core.backbones import check_arch

    why = check_arch(m.arch)
    _check(why is None, "model.arch", m.arch, why or "")
    _check(m.width >= 8, "model.width", m.width, "must be >= 8")
    _check(m.proj_layers in (2, 3), "model.proj_layers", m.proj_layers, "allowed values: 2, 3")
    for k in ("proj_hidden", "proj_out", "pred_hidden"):
        _check(m[k] >= 1, f"model.{k}", m[k], "must be >= 1")
    # method
    from hncl.core.methods import METHODS

    _check(me.name in METHODS, "method.name", me.name, f"allowed values: {', '.join(METHODS)}")
    OmegaConf.get_type(me).validate(me, _check)  # the method's own options (its Method.Config)
    # descriptor: null = the shard set's; a value must match the set's (checked against the set in
    # hncl.infra.preflight.pretrain, before anything is written)
    _check(d.resolution is None or d.resolution in (4, 8, 16, 32, 64), "descriptor.resolution", d.resolution,
           "allowed values: 4, 8, 16, 32, 64 (divisors of the 64x64 heatmap), or null (the shard set's)")
    _check(d.dim is None or d.dim >= 1, "descriptor.dim", d.dim, "must be >= 1 (or null: the shard set's)")
    _check(d.whiten >= 0, "descriptor.whiten", d.whiten,
           "must be >= 0 (0: the set's descriptor as fitted; k: its first k components whitened)")
    _check(d.dim is None or d.whiten <= d.dim, "descriptor.whiten", d.whiten,
           f"must be <= descriptor.dim={d.dim} (it whitens the first k of the descriptor's components)")
    # data (train_shards: a path; augment_on: an enum)
    da = cfg.data
    _check(da.image_size >= 16, "data.image_size", da.image_size, "must be >= 16")
    _check(da.batch_size >= 1, "data.batch_size", da.batch_size, "must be >= 1")
    _check(da.loader_workers >= 0, "data.loader_workers", da.loader_workers, "must be >= 0")
    _check(da.shuffle_buffer >= 1, "data.shuffle_buffer", da.shuffle_buffer, "must be >= 1")
    _check(da.global_batch_size is None or da.global_batch_size >= 1, "data.global_batch_size",
           da.global_batch_size, "must be >= 1 (or null: batch_size x ranks)")
    _check(da.steps_per_epoch is None or da.steps_per_epoch >= 1, "data.steps_per_epoch",
           da.steps_per_epoch, "must be >= 1 (or null: one pass over the set)")
    _check(0 < da.min_crop_scale <= 1, "data.min_crop_scale", da.min_crop_scale, "must be in (0, 1]")
    _check(0 <= da.colour <= 1, "data.colour", da.colour, "must be in [0, 1]")
    _check(0 <= da.hue <= 0.5, "data.hue", da.hue, "must be in [0, 0.5]")
    _check(0 <= da.grayscale <= 1, "data.grayscale", da.grayscale, "must be in [0, 1]")
    _check(0 <= da.max_skip_fraction <= 1, "data.max_skip_fraction", da.max_skip_fraction, "must be in [0, 1]")
    _check(da.stall_timeout_s > 0, "data.stall_timeout_s", da.stall_timeout_s, "must be > 0")
    # optim (name: an enum; scale_lr: a boolean)
    o = cfg.optim
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    # a run that ends inside its warm-up never reaches optim.lr
    _check(o.warmup_epochs <= o.epochs, "optim.warmup_epochs", o.warmup_epochs,
           f"must be <= optim.epochs={o.epochs} (the warm-up is part of the run)")
    _check(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", o.grad_clip,
           "must be > 0 (a gradient-norm bound), or null: no clipping")
    timm_only = "needs a timm encoder (model.arch=timm/NAME): the layers come from timm's group_matcher"
    for key, x in (("optim.layer_decay", o.layer_decay), ("finetune.layer_decay", cfg.finetune.layer_decay)):
        _check(x is None or 0 < x <= 1, key, x, "must be in (0, 1], or null: one lr for every layer")
        _check(x is None or str(cfg.model.arch).startswith("timm/"), key, x, timm_only)
    _check(cfg.finetune.layer_decay is None or cfg.finetune.protocol == Protocol.finetune, "finetune.layer_decay",
           cfg.finetune.layer_decay, "is for finetune.protocol=finetune (the linear probe trains no encoder layer)")
    # dist (strategy, precision, placement: enums; use_gpu: a boolean)
    di = cfg.dist
    _check(di.num_workers >= 1, "dist.num_workers", di.num_workers, "must be >= 1")
    _check(di.zero_stage in (0, 1, 2), "dist.zero_stage", di.zero_stage, "allowed values: 0, 1, 2")
    _check(di.max_failures >= 0, "dist.max_failures", di.max_failures,
           "must be >= 0 (restarts after a failure; Ray's -1, retry forever, is not offered)")
    _check(di.cpus_per_worker >= 1, "dist.cpus_per_worker", di.cpus_per_worker, "must be >= 1")
    _check(di.node_wait_s > 0, "dist.node_wait_s", di.node_wait_s,
           "must be > 0 (seconds to wait for a lost node; Ray's wait-forever is not offered)")
    # run (output_dir: a path or URL; record_sample_ids: a boolean)
    r = cfg.run
    _check_run_name(r.name)
    _check(bool(r.output_dir), "run.output_dir", r.output_dir, "must name a folder or an s3:// URL")
    _check(0 <= r.seed < 2**32, "run.seed", r.seed, "must be in [0, 2**32)")
    _check(r.log_every >= 1, "run.log_every", r.log_every, "must be >= 1")
    _check(r.checkpoint_every >= 1, "run.checkpoint_every", r.checkpoint_every, "must be >= 1")
    _check(r.keep_checkpoints >= 1, "run.keep_checkpoints", r.keep_checkpoints, "must be >= 1")
    _check(r.fail_at_step is None or r.fail_at_step >= 1, "run.fail_at_step", r.fail_at_step,
           "must be >= 1 (a step number), or null: no fault injection")
    _check(r.fail_rank >= 0, "run.fail_rank", r.fail_rank, "must be >= 0")
    # finetune (shard sets, init, checkpoint: paths; protocol, knn_index: enums; class_balanced: a boolean)
    ft = cfg.finetune
    _check(ft.num_classes in (7, 8), "finetune.num_classes", ft.num_classes, "allowed values: 7, 8")
    _check(ft.epochs >= 1, "finetune.epochs", ft.epochs, "must be >= 1")
    _check(ft.batch_size >= 1, "finetune.batch_size", ft.batch_size, "must be >= 1")
    _check(ft.lr > 0, "finetune.lr", ft.lr, "must be > 0")
    _check(ft.encoder_lr_scale >= 0, "finetune.encoder_lr_scale", ft.encoder_lr_scale, "must be >= 0")
    _check(ft.weight_decay >= 0, "finetune.weight_decay", ft.weight_decay, "must be >= 0")
    _check(0 <= ft.label_smoothing < 1, "finetune.label_smoothing", ft.label_smoothing, "must be in [0, 1)")
    _check(ft.knn_k >= 1, "finetune.knn_k", ft.knn_k, "must be >= 1")
    _check(ft.knn_temperature > 0, "finetune.knn_temperature", ft.knn_temperature, "must be > 0")
    # combinations that cannot run: refused here, before any worker starts
    _check(di.strategy == Strategy.deepspeed or di.zero_stage == 0, "dist.zero_stage",
           di.zero_stage, "ZeRO stages need dist.strategy=deepspeed")
    _check(di.precision != Dtype.float64, "dist.precision", "float64",
           "allowed values: float32, bfloat16, float16 (float64 is for method.queue_dtype)")
    _check(not (m.sync_bn and di.strategy == Strategy.deepspeed), "model.sync_bn", True,
           "SyncBatchNorm is for dist.strategy=ddp; DeepSpeed keeps per-rank BatchNorm")
    # the queue and the global batch are split over the ranks the run has
    check_ranks(cfg, *world_size(cfg))


def run_dir(cfg: DictConfig) -> str:
    """Where a run writes everything: run.output_dir/run.name (a local path or a URL)."""
    return cfg.run.output_dir.rstrip("/") + "/" + cfg.run.name


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str) -> None:
    """Write the resolved config (what the run actually used) next to its outputs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
