"""The pretraining loop, the same for Ray Train workers, torchrun processes and debug mode.

Per step: a batch of two views + stored heatmaps from the shard stream -> descriptors on the
device -> the method's training step (hncl/methods) -> the engine's step (DDP or DeepSpeed:
hncl/train/engine.py) -> metrics. Every rank runs exactly `steps_per_epoch` steps per epoch (the
stream of its share of each data epoch is endless), so collectives never wait on a rank that ran
out of data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import save_file

from hncl import dist as hdist
from hncl import storage, tempfiles
from hncl.config import Config, run_dir, validate, value
from hncl.data.augment import MEAN, STD, BatchViews, view_transform
from hncl.data.shards import ShardSet, add_skipped, iterate_forever, loader, train_pipeline
from hncl.errors import UserError
from hncl.methods import build_method
from hncl.model import HNCLModel
from hncl.train.engine import Engine, device_for, prepare_model, seed_everything
from hncl.train.optim import build_optimizer, warmup_cosine
from hncl.train.session import LocalSession, RaySession, Session


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf: the run stops; the last good checkpoint is left intact."""


def typed_config(cfg_dict: dict):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg_dict)
    validate(cfg)
    return cfg


class Trainer:
    """State of one worker's pretraining run; `fit()` runs it."""

    def __init__(self, cfg, session: Session):
        self.cfg, self.session = cfg, session
        self.rank, self.world = session.rank, session.world_size
        self.device = device_for(cfg)
        self.shards = ShardSet.open(cfg.data.train_shards)
        self.batch_size = cfg.data.batch_size
        self.steps_per_epoch = cfg.data.steps_per_epoch or max(1, self.shards.num_samples // (self.batch_size * self.world))
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.step = 0
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = prepare_model(HNCLModel.from_config(cfg.model), cfg, self.device)
        warmup = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        optimizer = build_optimizer(model, cfg.optim, self.batch_size * self.world)
        self.engine = Engine(cfg, model, optimizer, warmup_cosine(optimizer, warmup, self.total_steps), self.device,
                             batch_size=self.batch_size, grad_clip=cfg.optim.grad_clip, session=session, log=True)
        self.descriptor = self.shards.descriptor().to(self.device)
        self.method = build_method(cfg, self.engine.module, self.device, self.descriptor, autocast=self.engine.autocast)
        self.run_dir = self.engine.run_dir
        self.skipped: Dict[str, int] = {}  # lost samples by reason (this rank)
        self.skipped_where: Dict[str, list] = {}  # ... and which shards / samples
        self.samples_seen = 0
        # run.record_sample_ids: (sample id, data epoch) of every sample this rank trains on
        self.sample_ids: Optional[List[Tuple[int, int]]] = [] if cfg.run.record_sample_ids else None

    def save_checkpoint(self, metrics: Dict[str, float]) -> None:
        total: Dict[str, int] = {}  # the run's lost samples by reason, summed over ranks
        for counts in hdist.gather_objects(self.skipped):
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        self.engine.save_checkpoint(self.step, {"samples_seen": self.samples_seen, "skipped": total},
                                    metrics, self.method)

    def restore(self) -> bool:
        state = self.engine.restore(self.method)
        if state is None:
            return False
        self.step, self.samples_seen = state["step"], state.get("samples_seen", 0)
        self.skipped = state.get("skipped", {}) if self.rank == 0 else {}  # global counts: once
        return True

    # -- the loop ----------------------------------------------------------------------------
    def _step(self, batch: dict) -> Dict[str, float]:
        dev = self.device
        nb = dev.type == "cuda"
        if "image" in batch:  # data.augment_on=device: the views are made here, per batch
            x1, x2 = self.batch_views(batch["image"].to(dev, non_blocking=nb))
        else:
            x1, x2 = batch["x1"].to(dev, non_blocking=nb), batch["x2"].to(dev, non_blocking=nb)
        inputs = {"x1": self.engine.inputs(x1), "x2": self.engine.inputs(x2),
                  "heatmap": batch["heatmap"].to(dev, non_blocking=nb),
                  "id": batch["id"].to(dev), "label": batch["label"].to(dev)}
        loss, metrics = self.method.training_step(inputs)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"loss became {metrics['loss']} at step {self.step + 1} (terms: "
                f"{ {k: v for k, v in metrics.items() if k.startswith('loss')} }); stopping. The last good "
                f"checkpoint in {self.run_dir} is intact: lower optim.lr or set optim.grad_clip, then resume.")
        self.engine.step(loss)
        return metrics

    def fit(self) -> dict:
        try:
            return self._fit()
        except BaseException:
            self.engine.abort()  # no temporary files left behind (a restore that failed included)
            raise

    def _fit(self) -> dict:
        cfg = self.cfg
        resumed = self.restore()
        self._first_step = self.step
        if self.rank == 0:
            print(f"[hncl] run directory: {self.run_dir} ({'resumed at step ' + str(self.step) if resumed else 'new'}); "
                  f"{self.world} rank(s), {self.engine.strategy}, {self.total_steps} steps "
                  f"({self.steps_per_epoch}/epoch), batch {self.batch_size}/rank", flush=True)
        on_device = value(cfg.data.augment_on) == "device"
        d = cfg.data
        recipe = dict(min_scale=d.min_crop_scale, colour=d.colour, grayscale=d.grayscale, hue=d.hue)
        if on_device:
            self.batch_views = BatchViews(d.image_size, **recipe)
        views = None if on_device else view_transform(d.image_size, **recipe)
        # this rank's share of every data epoch; a resumed run starts over the epoch it stopped in
        pipeline = train_pipeline(self.shards, self.batch_size, seed=cfg.run.seed,
                                  shuffle_buffer=cfg.data.shuffle_buffer, view_transform=views, rank=self.rank,
                                  world=self.world, start_epoch=self.step // self.steps_per_epoch,
                                  stall_timeout_s=cfg.data.stall_timeout_s)
        batches = iterate_forever(loader(pipeline, cfg.data.loader_workers, timeout_s=cfg.data.stall_timeout_s + 60))
        metrics = self._run(cfg, batches)
        if self.sample_ids is not None:
            storage.write_json(storage.join(self.run_dir, f"sample_ids_rank{self.rank}.json"),
                               {"rank": self.rank, "world_size": self.world,
                                "node_ip": _node_ip(), "first_step": self._first_step,
                                "ids": [i for i, _ in self.sample_ids], "epochs": [e for _, e in self.sample_ids]})
        if self.rank == 0:
            self.export_encoder()
            print(f"[hncl] finished {self.step} steps; run directory: {self.run_dir}", flush=True)
        self.engine.close()
        self.session.barrier()
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def _run(self, cfg, batches) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        window_start, window_samples = time.time(), 0
        while self.step < self.total_steps:
            batch = next(batches)
            add_skipped(self.skipped, batch, self.skipped_where)
            if self.sample_ids is not None:
                self.sample_ids.extend(zip(batch["id"].tolist(), batch["epoch"].tolist()))
            metrics = self._step(batch)
            self.step += 1
            self.samples_seen += len(batch["id"]) * self.world
            window_samples += len(batch["id"]) * self.world
            self.engine.maybe_fail(self.step)
            last = self.step == self.total_steps
            if self.step % cfg.run.log_every == 0 or last:
                skipped = self._global_skipped()
                elapsed = time.time() - window_start
                metrics.update(step=self.step, epoch=self.step / self.steps_per_epoch,
                               lr=self.engine.lr, images_per_s=window_samples / max(elapsed, 1e-9),
                               skipped=skipped)
                self.engine.log.write(metrics)
                window_start, window_samples = time.time(), 0
                self._check_skipped(skipped)
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if self.step % cfg.run.checkpoint_every == 0 or last:
                self.save_checkpoint(numeric)
            elif self.step % cfg.run.log_every == 0:
                self.session.report_metrics(numeric)
        return metrics

    def _global_skipped(self) -> int:
        n = torch.tensor([sum(self.skipped.values())], dtype=torch.float64, device=self.device)
        return int(hdist.all_reduce_sum(n)[0])

    def _check_skipped(self, skipped: int) -> None:
        """Collective (every rank sees the same global count): stop when the lost fraction of
        what the stream should have delivered exceeds data.max_skip_fraction, naming where."""
        expected = self.samples_seen + skipped
        if skipped <= self.cfg.data.max_skip_fraction * max(1, expected):
            return
        where: Dict[str, list] = {}
        for rank_places in hdist.gather_objects(self.skipped_where):
            for reason, names in rank_places.items():
                where.setdefault(reason, [])
                where[reason] += [n for n in names if n not in where[reason]]
        detail = "; ".join(f"{reason}: {', '.join(sorted(names)[:6])}{' ...' if len(names) > 6 else ''}"
                           for reason, names in sorted(where.items()))
        raise UserError(f"{skipped} of {expected} samples ({skipped / expected:.1%}) streamed from {self.shards.root} "
                        f"were lost, above data.max_skip_fraction={self.cfg.data.max_skip_fraction} ({detail}); "
                        f"check the set with `python -c \"from hncl.data.make_shards import verify; "
                        f"verify('{self.shards.root}')\"`")

    def export_encoder(self) -> None:
        """encoder.safetensors (torchvision ResNet keys) + encoder.json, for fine-tuning."""
        encoder = self.engine.model.encoder
        state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
        with tempfile_path() as path:
            save_file(state, path, metadata={"arch": encoder.arch})
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, "encoder.safetensors"), f.read())
        info = {"arch": encoder.arch, "width": encoder.width, "stem": encoder.stem, "out_dim": encoder.out_dim,
                "image_size": self.cfg.data.image_size, "step": self.step, "shards": self.cfg.data.train_shards,
                "method": self.method.name, "normalize": {"mean": list(MEAN), "std": list(STD)}}
        storage.write_bytes(storage.join(self.run_dir, "encoder.json"), json.dumps(info, indent=1).encode())


def _node_ip() -> Optional[str]:
    """The Ray node this worker runs on (None outside Ray; debug mode never imports Ray)."""
    ray = sys.modules.get("ray")
    return ray.util.get_node_ip_address() if ray is not None and ray.is_initialized() else None


@contextlib.contextmanager
def tempfile_path():
    fd, path = tempfiles.mkstemp("weights", suffix=".safetensors")
    os.close(fd)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)


def train_loop_per_worker(config: dict) -> dict:
    """Entry point of every worker. config: {"cfg": resolved config dict, "session": "ray"|"local"}."""
    tempfiles.sweep_orphans_once()
    cfg = typed_config(config["cfg"])
    folder = run_dir(cfg)
    session: Session = RaySession(folder) if config.get("session") == "ray" else \
        LocalSession(folder, keep=cfg.run.keep_checkpoints)
    if session.rank == 0:
        storage.makedirs(folder)
        storage.write_bytes(storage.join(folder, "config.yaml"), OmegaConf.to_yaml(cfg).encode())
    with hdist.torch_threads(cfg.dist.cpus_per_worker):
        return Trainer(cfg, session).fit()


def init_local_process_group() -> None:
    """For debug mode and torchrun: a gloo/nccl group when WORLD_SIZE > 1, none otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
