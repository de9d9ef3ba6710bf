"""The pretraining loop, the same for Ray Train workers, torchrun processes and debug mode.

Per step: a batch of two views + stored heatmaps from the shard stream -> descriptors on the
device -> the method's training step (hncl/methods) -> the engine's step (DDP or DeepSpeed:
hncl/train/engine.py) -> metrics. Every rank takes one batch of global batch / ranks per step
from its endless share of the stream, so collectives never wait on a rank that ran out of data.
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

from hncl.config import AugmentOn, Stem, Strategy, check_ranks, run_dir, typed
from hncl.core import dist as hdist
from hncl.core.methods import build_method
from hncl.core.model import HNCLModel
from hncl.data.augment import MEAN, STD, BatchViews, view_transform
from hncl.data.epoch_plan import StreamState
from hncl.data.shards import ShardSet, add_skipped, iterate_forever, loader, train_pipeline
from hncl.errors import InputError, UserError
from hncl.infra import storage, tempfiles
from hncl.train import faults
from hncl.train.engine import Engine, device_for, prepare_model, read_train_state, seed_everything
from hncl.train.optim import SampleSchedule, build_optimizer
from hncl.train.session import LocalSession, RaySession, Session


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf: the run stops; the last good checkpoint is left intact."""


def typed_config(cfg_dict: dict):
    return typed(cfg_dict)


class Trainer:
    """State of one worker's pretraining run; `fit()` runs it.

    The run is defined in samples, not steps, so that it does not depend on the world size: its
    global batch (data.global_batch_size, else data.batch_size x the ranks of its first start)
    is kept across resumes and split over the ranks there are; training length, warm-up and the
    lr at every point are functions of the samples trained. The data stream's position is part
    of every checkpoint (hncl/data/epoch_plan.py)."""

    def __init__(self, cfg, session: Session):
        self.cfg, self.session = cfg, session
        self.rank, self.world = session.rank, session.world_size
        self.device = device_for(cfg.dist)
        self.shards = ShardSet.open(cfg.data.train_shards)
        from hncl.infra.preflight import descriptor_matches

        descriptor_matches(cfg, self.shards)  # the driver checked it too; a worker may be started directly
        self.readers_per_rank = max(1, cfg.data.loader_workers)
        self.step, self.samples_seen = 0, 0
        self.skipped: Dict[str, int] = {}  # lost samples by reason (this rank)
        self.skipped_where: Dict[str, list] = {}  # ... and which shards / samples
        # run.record_sample_ids: (sample id, data epoch) of every sample this rank trains on
        self.sample_ids: Optional[List[Tuple[int, int]]] = [] if cfg.run.record_sample_ids else None

    def _build(self, saved: Optional[dict]) -> None:
        """The model, optimiser, engine and method for this world size, with the run's global
        batch and schedule (from `saved`, the checkpoint's train_state, when resuming)."""
        cfg = self.cfg
        self.global_batch = int(cfg.data.global_batch_size or (saved or {}).get("global_batch")
                                or cfg.data.batch_size * ((saved or {}).get("world_size") or self.world))
        if self.global_batch % self.world:
            raise UserError(f"the run's global batch of {self.global_batch} samples cannot be split evenly over "
                            f"{self.world} ranks: run on a number of ranks that divides it, or set "
                            f"data.global_batch_size to a multiple of {self.world} (the lr follows it)")
        self.batch_size = self.global_batch // self.world
        # a resume keeps its checkpoint's global batch, which the driver could not check against
        check_ranks(cfg, self.world, "this run's ranks", self.global_batch)
        if self.batch_size != cfg.data.batch_size and self.rank == 0:
            print(f"[hncl] {self.batch_size} samples per rank: the run's global batch of {self.global_batch} over "
                  f"{self.world} ranks (data.batch_size={cfg.data.batch_size} applies to a run's first start; "
                  f"data.global_batch_size changes the global batch)", flush=True)
        n = self.shards.num_samples
        if n <= 0:
            raise UserError(f"{self.shards.root} holds no samples: nothing to train on")
        # data.steps_per_epoch counts global batches of the run's first start: a later change of the
        # global batch must not stretch or shrink the schedule
        self.epoch_batch = int((saved or {}).get("epoch_batch") or self.global_batch)
        self.samples_per_epoch = cfg.data.steps_per_epoch * self.epoch_batch if cfg.data.steps_per_epoch else n
        self.schedule = SampleSchedule(total_samples=int(cfg.optim.epochs * self.samples_per_epoch),
                                       warmup_samples=int(round(cfg.optim.warmup_epochs * self.samples_per_epoch)))
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = prepare_model(HNCLModel.from_config(cfg.model, cfg.data.image_size), cfg.dist, self.device,
                              sync_bn=cfg.model.sync_bn)
        optimizer = build_optimizer(model, cfg.optim, self.global_batch)
        self.engine = Engine(cfg.dist, model, optimizer, None, self.device, run_dir=run_dir(cfg),
                             batch_size=self.batch_size, grad_clip=cfg.optim.grad_clip, session=self.session, log=True)
        from hncl.infra.preflight import run_descriptor

        self.descriptor = run_descriptor(cfg, self.shards).to(self.device)  # (descriptor.whiten applied)
        self.method = build_method(cfg, self.engine.module, self.device, self.descriptor, autocast=self.engine.autocast)
        self.run_dir = self.engine.run_dir
        self.stream = StreamState.start(self.shards.counts, cfg.run.seed, self.world * self.readers_per_rank,
                                        cfg.data.shuffle_buffer)

    @property
    def total_steps(self) -> int:
        """Steps this run ends at, from where it is now (the global batch may have changed)."""
        left = max(0, self.schedule.total_samples - self.samples_seen)
        return self.step + -(-left // self.global_batch)

    def save_checkpoint(self, metrics: Dict[str, float]) -> None:
        total: Dict[str, int] = {}  # the run's lost samples by reason, summed over ranks
        for counts in hdist.gather_objects(self.skipped):
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        for positions in hdist.gather_objects(self._my_positions()):  # every reader's, rank 0 writes them
            for reader, position in positions.items():
                self.stream.positions[reader] = position
        stream = self.stream.to_json()

        def extra(folder: str) -> None:
            if self.rank == 0:
                with open(os.path.join(folder, "stream.json"), "w") as f:
                    json.dump(stream, f)

        if self.sample_ids is not None:  # before the commit: a resume drops records past its checkpoint
            self._write_sample_ids_since_last_checkpoint()
        self.engine.save_checkpoint(self.step, {"samples_seen": self.samples_seen, "skipped": total,
                                                "global_batch": self.global_batch, "epoch_batch": self.epoch_batch},
                                    metrics, self.method, extra)

    # -- run.record_sample_ids ---------------------------------------------------------------
    # sample_ids/STEP_rank{r}.json: what rank r trained on since the previous checkpoint, written
    # with every checkpoint, so that the records of a run killed and resumed (on any world size)
    # are exactly what the final weights were trained on: records past the checkpoint a run
    # resumes from are removed then
    def _write_sample_ids_since_last_checkpoint(self) -> None:
        new = self.sample_ids[self._ids_saved:]
        name = f"{self.step:08d}_rank{self.rank}.json"
        storage.write_json(storage.join(storage.join(self.run_dir, "sample_ids"), name),
                           {"rank": self.rank, "world_size": self.world, "after_step": self._ids_saved_step,
                            "step": self.step, "ids": [i for i, _ in new], "epochs": [e for _, e in new]})
        self._ids_saved, self._ids_saved_step = len(self.sample_ids), self.step

    def _drop_sample_ids_after(self, step: int) -> None:
        folder = storage.join(self.run_dir, "sample_ids")
        if self.rank != 0 or not storage.exists(folder):
            return
        for name in storage.listdir(folder):
            if int(name.split("_")[0]) > step:
                storage.remove(storage.join(folder, name))

    def _my_positions(self) -> Dict[int, tuple]:
        first = self.rank * self.readers_per_rank
        return {r: self.stream.positions[r] for r in range(first, first + self.readers_per_rank)}

    def _restore(self, folder: str) -> None:
        state = self.engine.restore_from(folder, self.method)
        self.step, self.samples_seen = state["step"], state.get("samples_seen", 0)
        self.skipped = state.get("skipped", {}) if self.rank == 0 else {}  # global counts: once
        readers = self.world * self.readers_per_rank
        path = os.path.join(folder, "stream.json")
        if not os.path.exists(path):  # a checkpoint of an hncl before stream positions
            epoch = self.samples_seen // max(1, self.shards.num_samples)
            self.stream = StreamState.start(self.shards.counts, self.cfg.run.seed, readers,
                                            self.cfg.data.shuffle_buffer, epoch)
            if self.rank == 0:
                print(f"[hncl] the checkpoint holds no stream position (an older hncl): data epoch {epoch} "
                      f"starts over", flush=True)
            return
        with open(path) as f:
            stream = StreamState.from_json(json.load(f))
        if stream.counts != self.shards.counts or stream.seed != self.cfg.run.seed:
            raise UserError(f"the checkpoint in {self.run_dir} was trained on another shard set or run.seed "
                            f"({len(stream.counts)} shards, {sum(stream.counts)} samples, seed {stream.seed}; now "
                            f"{len(self.shards.counts)} shards, {self.shards.num_samples} samples, seed "
                            f"{self.cfg.run.seed}): use a new run.name")
        block = self.cfg.data.shuffle_buffer
        if stream.readers != readers:  # another world size or loader workers: the rest is dealt anew
            stream = stream.resized(readers, block)
            if self.rank == 0:
                print(f"[hncl] the stream's position is dealt to {readers} readers ({self.world} ranks x "
                      f"{self.readers_per_rank} loader workers): the rest of data epoch "
                      f"{stream.positions[0][0]} once over them", flush=True)
        elif stream.block != block:
            if self.rank == 0:
                print(f"[hncl] data.shuffle_buffer={block} (was {stream.block}) applies from the next data epoch "
                      f"on: the epochs in progress keep the order their positions count in", flush=True)
            stream = stream.reblocked(block)
        self.stream = stream

    # -- the loop ----------------------------------------------------------------------------
    def _step(self, batch: dict, lr_factor: float) -> Dict[str, float]:
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
        self.engine.step(loss, lr_factor)
        return metrics

    def fit(self) -> dict:
        try:
            return self._fit()
        except BaseException:
            if getattr(self, "engine", None) is not None:
                self.engine.abort()  # no temporary files left behind (a restore that failed included)
            raise

    def _fit(self) -> dict:
        cfg = self.cfg
        with self.session.restored() as folder:
            self._build(None if folder is None else read_train_state(folder))
            if folder is not None:
                self._restore(folder)
        self._first_step = self.step
        if self.sample_ids is not None:
            self._ids_saved, self._ids_saved_step = 0, self.step
            self._drop_sample_ids_after(self.step)
        if self.rank == 0:
            print(f"[hncl] run directory: {self.run_dir} "
                  f"({'resumed at step ' + str(self.step) if folder is not None else 'new'}); "
                  f"{self.world} rank(s), {self.engine.strategy.value}, {self.total_steps} steps of "
                  f"{self.global_batch} samples ({self.batch_size}/rank), "
                  f"{self.schedule.total_samples} samples in all", flush=True)
        on_device = AugmentOn(cfg.data.augment_on) is AugmentOn.device
        d = cfg.data
        recipe = dict(min_scale=d.min_crop_scale, colour=d.colour, grayscale=d.grayscale, hue=d.hue)
        if on_device:
            self.batch_views = BatchViews(d.image_size, **recipe)
        views = None if on_device else view_transform(d.image_size, **recipe)
        # this rank's share of every data epoch, from the checkpoint's stream position on
        pipeline = train_pipeline(self.shards, self.batch_size, seed=cfg.run.seed, view_transform=views,
                                  rank=self.rank, world=self.world, stream=self.stream,
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
        while self.samples_seen < self.schedule.total_samples:
            batch = next(batches)
            self._advance_stream(batch["stream"])
            add_skipped(self.skipped, batch, self.skipped_where)
            if self.sample_ids is not None:
                self.sample_ids.extend(zip(batch["id"].tolist(), batch["epoch"].tolist()))
            lr_factor = self.schedule.factor(self.samples_seen, self.global_batch)
            metrics = self._step(batch, lr_factor)
            self.step += 1
            self.samples_seen += self.global_batch
            window_samples += self.global_batch
            faults.maybe_fail(cfg.run, self.engine.run_dir, self.rank, self.step)
            last = self.samples_seen >= self.schedule.total_samples
            if self.step % cfg.run.log_every == 0 or last:
                skipped = self._global_skipped()
                elapsed = time.time() - window_start
                metrics.update(step=self.step, samples=self.samples_seen,
                               epoch=self.samples_seen / self.shards.num_samples, lr=self.engine.lr,
                               images_per_s=window_samples / max(elapsed, 1e-9), skipped=skipped)
                self.engine.log.write(metrics)
                window_start, window_samples = time.time(), 0
                self._check_skipped(skipped)
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if self.step % cfg.run.checkpoint_every == 0 or last:
                self.save_checkpoint(numeric)
            elif self.step % cfg.run.log_every == 0:
                self.session.report_metrics(numeric)
        return metrics

    def _advance_stream(self, position) -> None:
        """A batch was taken: its reader is past it, and the rank's next reader is the next one."""
        reader, epoch, emitted = (int(x) for x in position)
        self.stream.positions[reader] = (epoch, emitted)
        self.stream.turn = (reader - self.rank * self.readers_per_rank + 1) % self.readers_per_rank

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
        """encoder.safetensors (the encoder's own key layout: torchvision, IResNet or timm) + encoder.json,
        for fine-tuning."""
        encoder = self.engine.model.encoder
        state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
        with tempfile_path() as path:
            save_file(state, path, metadata={"arch": encoder.arch})
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, "encoder.safetensors"), f.read())
        m = self.cfg.model
        info = {"arch": str(m.arch), "width": int(m.width), "stem": Stem(m.stem).value, "out_dim": encoder.out_dim,
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
    """Entry point of every worker (hncl.train.launch.worker_config)."""
    tempfiles.sweep_orphans_once()
    cfg = typed_config(config["cfg"])
    folder = run_dir(cfg)
    if config.get("session") == "ray":
        return _train(cfg, RaySession(folder))
    with local_group(cfg):
        return _train(cfg, LocalSession(folder, keep=cfg.run.keep_checkpoints))


def _train(cfg, session: Session) -> dict:
    """One rank's pretraining run, checkpointing through `session`."""
    folder = run_dir(cfg)
    trainer = Trainer(cfg, session)  # opens and checks the inputs: a refusal leaves nothing written
    if session.rank == 0:
        try:
            storage.makedirs(folder)
        except OSError as e:  # e.g. a path under /proc, a read-only disk
            raise InputError(f"run.output_dir: cannot make the run directory {folder}: {e.strerror or e}") from None
        storage.write_bytes(storage.join(folder, "config.yaml"), OmegaConf.to_yaml(cfg).encode())
    with hdist.torch_threads(cfg.dist.cpus_per_worker):
        return trainer.fit()


@contextlib.contextmanager
def local_group(cfg):
    """Debug mode and torchrun ranks: the group torchrun describes (none for one plain process).
    DeepSpeed needs a group even alone, and looks for MPI unless the torch.distributed variables
    are set: a one-rank gloo/nccl group, destroyed on exit, with the variables torchrun did not set."""
    if Strategy(cfg.dist.strategy) is not Strategy.deepspeed:
        init_local_process_group()
        yield
        return
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(hdist.free_port())}
    with hdist.local_process_group("nccl" if cfg.dist.use_gpu else "gloo", env):
        yield


def init_local_process_group() -> None:
    """For debug mode and torchrun: a gloo/nccl group when WORLD_SIZE > 1, none otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
