"""The pretraining loop, the same for Ray Train workers, torchrun processes and debug mode.

Per step: a batch of two views + stored heatmaps from the shard stream -> descriptors on the
device -> HNCL step (DDP or DeepSpeed) -> metrics. Every rank runs exactly `steps_per_epoch`
steps per epoch (the stream is resampled and endless), so collectives never wait on a rank that
ran out of data. Checkpoints hold the model (or the DeepSpeed engine), optimiser, scheduler,
step, RNG states and each rank's queue slice (queue_rank{r}.pt).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import random
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from hncl import dist as hdist
from hncl import storage
from hncl.config import Config, validate
from hncl.data.augment import BatchViews, view_transform
from hncl.data.shards import ShardSet, add_skipped, iterate_forever, loader, train_pipeline
from hncl.errors import UserError
from hncl.method import build_hncl
from hncl.model import HNCLModel
from hncl.queue import reshard_states
from hncl.train.metrics import MetricsLog
from hncl.train.optim import build_optimizer, warmup_cosine
from hncl.train.session import LocalSession, RaySession, Session


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf: the run stops; the last good checkpoint is left intact."""


def _value(x):
    return str(getattr(x, "value", x))


def typed_config(cfg_dict: dict):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg_dict)
    validate(cfg)
    return cfg


def run_dir_of(cfg) -> str:
    return storage.join(cfg.run.output_dir, cfg.run.name)


def _device(cfg) -> torch.device:
    if cfg.dist.use_gpu:
        if not torch.cuda.is_available():
            raise UserError("dist.use_gpu=true but this worker sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": [x.tolist() if isinstance(x, np.ndarray) else x
                                                  for x in np.random.get_state()],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _deepspeed_config(cfg, batch_size: int) -> dict:
    precision = _value(cfg.dist.precision)
    ds = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": cfg.dist.zero_stage},
          # our own torch optimiser (SGD, AdamW, LARS) is handed to DeepSpeed; ZeRO partitions any
          # torch optimiser's state, but refuses those outside its own list unless told
          "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if cfg.optim.grad_clip:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    # BatchNorm buffers must follow the half-precision parameters or the forward fails
    if precision == "bfloat16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    elif precision == "float16":
        ds["fp16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "fp16"}
    return ds


class Trainer:
    """State of one worker's run; `fit()` runs it."""

    def __init__(self, cfg, session: Session):
        self.cfg, self.session = cfg, session
        self.rank, self.world = session.rank, session.world_size
        self.device = _device(cfg)
        self.strategy = _value(cfg.dist.strategy)
        self.shards = ShardSet.open(cfg.data.train_shards)
        self.batch_size = cfg.data.batch_size
        self.steps_per_epoch = cfg.data.steps_per_epoch or max(1, self.shards.num_samples // (self.batch_size * self.world))
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.step = 0
        _seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = HNCLModel.from_config(cfg.model)
        if cfg.model.sync_bn and self.world > 1 and self.strategy == "ddp":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        global_batch = self.batch_size * self.world
        warmup = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(model, cfg.optim, global_batch)
        self.scheduler = warmup_cosine(self.optimizer, warmup, self.total_steps)
        self.engine = None
        if self.strategy == "deepspeed":
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                config=_deepspeed_config(cfg, self.batch_size), dist_init_required=False)
            wrapped = self.engine
        elif self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            wrapped = model
        self.descriptor = self.shards.descriptor().to(self.device)
        precision = _value(cfg.dist.precision)
        autocast = None
        if self.device.type == "cuda" and precision != "float32" and self.strategy == "ddp":
            dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
            autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
        self.scaler = torch.amp.GradScaler("cuda") if autocast and precision == "float16" else None
        # DeepSpeed's bf16/fp16 modes cast the weights, not the inputs: the views must follow
        self.input_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision) \
            if self.engine is not None else None
        self.hncl = build_hncl(cfg, wrapped, self.device, self.descriptor, key_dim=self.descriptor.dim,
                               autocast=autocast)
        self.run_dir = run_dir_of(cfg)
        self.log = MetricsLog(self.run_dir, enabled=self.rank == 0)
        self.skipped: Dict[str, int] = {}
        self.samples_seen = 0

    # -- checkpoints -------------------------------------------------------------------------
    def _write_checkpoint(self, folder: str) -> None:
        r = self.rank
        if self.engine is not None:
            self.engine.save_checkpoint(folder, tag="deepspeed")
        elif r == 0:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                      os.path.join(folder, "model.safetensors"))
            torch.save(self.optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
        if self.hncl.queue is not None:
            torch.save(self.hncl.queue.state_dict(), os.path.join(folder, f"queue_rank{r}.pt"))
        with open(os.path.join(folder, f"rng_rank{r}.json"), "w") as f:
            json.dump(_rng_state(), f)
        if r == 0:
            with open(os.path.join(folder, "train_state.json"), "w") as f:
                json.dump({"step": self.step, "world_size": self.world, "strategy": self.strategy,
                           "samples_seen": self.samples_seen, "skipped": self.skipped}, f)

    def save_checkpoint(self, metrics: Dict[str, float]) -> None:
        self.log.flush()
        self.session.save(self.step, self._write_checkpoint, {**metrics, "step": self.step})

    def restore(self) -> bool:
        folder = self.session.restore_dir()
        if folder is None:
            return False
        with open(os.path.join(folder, "train_state.json")) as f:
            state = json.load(f)
        if state["strategy"] != self.strategy:
            raise UserError(f"checkpoint in {self.run_dir} was written with strategy {state['strategy']}; "
                               f"this run uses {self.strategy}. Use a new run.name.")
        if self.engine is not None:
            self.engine.load_checkpoint(folder, tag="deepspeed")
        else:
            with open(os.path.join(folder, "model.safetensors"), "rb") as f:  # read, not mmap: robust to
                weights = load_safetensors(f.read())                         # files replaced underneath
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=self.device,
                                                      weights_only=True))
            self.scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
        if self.hncl.queue is not None:
            self._restore_queue(folder, state["world_size"])
        rng = os.path.join(folder, f"rng_rank{self.rank}.json")
        if os.path.exists(rng):
            with open(rng) as f:
                _set_rng_state(json.load(f))
        self.step, self.samples_seen = state["step"], state.get("samples_seen", 0)
        self.skipped = state.get("skipped", {})
        self.log.truncate_after(self.step)
        self._record_resume(state)
        return True

    def _record_resume(self, state: dict) -> None:
        """Append to resumes.jsonl which step the run came back from and a digest of every rank's
        restored queue slice (compare with hncl.queue.state_digest of the checkpoint's files)."""
        digest = self.hncl.queue.digest() if self.hncl.queue is not None else None
        digests = [digest]
        if hdist.is_distributed():
            digests = [None] * self.world
            dist.all_gather_object(digests, digest)
        if self.rank == 0:
            url = storage.join(self.run_dir, "resumes.jsonl")
            old = storage.read_bytes(url).decode() if storage.exists(url) else ""
            line = json.dumps({"step": self.step, "saved_world_size": state["world_size"], "world_size": self.world,
                               "queue_digests": digests, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            storage.write_bytes(url, (old + line + "\n").encode())

    def _restore_queue(self, folder: str, saved_world: int) -> None:
        files = sorted(glob.glob(os.path.join(folder, "queue_rank*.pt")))
        if len(files) != saved_world:
            raise UserError(f"checkpoint {folder} has {len(files)} queue slices for world size {saved_world}")
        if saved_world == self.world:
            self.hncl.queue.load_state_dict(torch.load(os.path.join(folder, f"queue_rank{self.rank}.pt"),
                                                       weights_only=True))
            return
        if not self.cfg.run.reshard_queue:
            raise UserError(
                f"the checkpoint's neighbour queue is split over {saved_world} ranks but this run has {self.world}. "
                f"Resume with dist.num_workers={saved_world}, or set run.reshard_queue=true to re-split the "
                f"queue over {self.world} ranks (newest entries kept).")
        states = [torch.load(f, weights_only=True) for f in files]
        new = reshard_states(states, self.world, self.cfg.method.queue_size)
        self.hncl.queue.load_state_dict(new[self.rank])

    # -- the loop ----------------------------------------------------------------------------
    def _step(self, batch: dict) -> Dict[str, float]:
        dev = self.device
        nb = dev.type == "cuda"
        mf = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        if "image" in batch:  # data.augment_on=device: the views are made here, per batch
            x1, x2 = self.batch_views(batch["image"].to(dev, non_blocking=nb))
        else:
            x1, x2 = batch["x1"].to(dev, non_blocking=nb), batch["x2"].to(dev, non_blocking=nb)
        if self.input_dtype is not None:
            x1, x2 = x1.to(self.input_dtype), x2.to(self.input_dtype)
        inputs = {"x1": x1.contiguous(memory_format=mf), "x2": x2.contiguous(memory_format=mf),
                  "heatmap": batch["heatmap"].to(dev, non_blocking=nb),
                  "id": batch["id"].to(dev), "label": batch["label"].to(dev)}
        loss, metrics = self.hncl.training_step(inputs)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"loss became {metrics['loss']} at step {self.step + 1} (terms: "
                f"{ {k: v for k, v in metrics.items() if k.startswith('loss')} }); stopping. The last good "
                f"checkpoint in {self.run_dir} is intact: lower optim.lr or set optim.grad_clip, then resume.")
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        return metrics

    def _inject_fault(self) -> None:
        cfg = self.cfg.run
        if cfg.fail_at_step is None or self.step != cfg.fail_at_step or self.rank != cfg.fail_rank:
            return
        marker = storage.join(self.run_dir, ".fault_injected")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"")
        print(f"[hncl] fault injection: rank {self.rank} exits at step {self.step}", flush=True)
        os._exit(1)

    def fit(self) -> dict:
        cfg = self.cfg
        resumed = self.restore()
        if self.rank == 0:
            print(f"[hncl] run directory: {self.run_dir} ({'resumed at step ' + str(self.step) if resumed else 'new'}); "
                  f"{self.world} rank(s), {self.strategy}, {self.total_steps} steps "
                  f"({self.steps_per_epoch}/epoch), batch {self.batch_size}/rank", flush=True)
        on_device = _value(cfg.data.augment_on) == "device"
        if on_device:
            self.batch_views = BatchViews(cfg.data.image_size, cfg.data.min_crop_scale)
        views = None if on_device else view_transform(cfg.data.image_size, cfg.data.min_crop_scale)
        pipeline = train_pipeline(self.shards, self.batch_size, seed=cfg.run.seed + 1000 * self.step,
                                  shuffle_buffer=cfg.data.shuffle_buffer, view_transform=views)
        batches = iterate_forever(loader(pipeline, cfg.data.loader_workers))
        metrics: Dict[str, float] = {}
        window_start, window_samples = time.time(), 0
        while self.step < self.total_steps:
            batch = next(batches)
            add_skipped(self.skipped, batch)
            metrics = self._step(batch)
            self.step += 1
            self.samples_seen += len(batch["id"]) * self.world
            window_samples += len(batch["id"]) * self.world
            self._inject_fault()
            last = self.step == self.total_steps
            if self.step % cfg.run.log_every == 0 or last:
                skipped = self._global_skipped()
                elapsed = time.time() - window_start
                metrics.update(step=self.step, epoch=self.step / self.steps_per_epoch,
                               lr=self.optimizer.param_groups[0]["lr"], images_per_s=window_samples / max(elapsed, 1e-9),
                               skipped=skipped)
                self.log.write(metrics)
                window_start, window_samples = time.time(), 0
                self._check_skipped(skipped)
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if self.step % cfg.run.checkpoint_every == 0 or last:
                self.save_checkpoint(numeric)
            elif self.step % cfg.run.log_every == 0:
                self.session.report_metrics(numeric)
        if self.rank == 0:
            self.export_encoder()
            print(f"[hncl] finished {self.step} steps; run directory: {self.run_dir}", flush=True)
        self.log.close()
        self.session.barrier()
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def _global_skipped(self) -> int:
        n = torch.tensor([sum(self.skipped.values())], dtype=torch.float64, device=self.device)
        return int(hdist.all_reduce_sum(n)[0])

    def _check_skipped(self, skipped: int) -> None:
        if skipped > self.cfg.data.max_skip_fraction * max(1, self.samples_seen):
            raise UserError(f"{skipped} corrupt samples among {self.samples_seen} streamed from "
                               f"{self.shards.root}, above data.max_skip_fraction={self.cfg.data.max_skip_fraction}"
                               f" ({self.skipped} on rank {self.rank}); check the set with hncl.data.make_shards.verify")

    def export_encoder(self) -> None:
        """encoder.safetensors (torchvision ResNet keys) + encoder.json, for fine-tuning."""
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.encoder.state_dict().items()}
        with tempfile_path() as path:
            save_file(state, path, metadata={"arch": self.model.encoder.arch})
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, "encoder.safetensors"), f.read())
        info = {"arch": self.model.encoder.arch, "width": self.model.encoder.width, "stem": self.model.encoder.stem,
                "out_dim": self.model.encoder.out_dim, "image_size": self.cfg.data.image_size, "step": self.step,
                "shards": self.cfg.data.train_shards, "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}
        storage.write_bytes(storage.join(self.run_dir, "encoder.json"), json.dumps(info, indent=1).encode())


@contextlib.contextmanager
def tempfile_path():
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)


def train_loop_per_worker(config: dict) -> dict:
    """Entry point of every worker. config: {"cfg": resolved config dict, "session": "ray"|"local"}."""
    cfg = typed_config(config["cfg"])
    run_dir = run_dir_of(cfg)
    session: Session = RaySession(run_dir) if config.get("session") == "ray" else \
        LocalSession(run_dir, keep=cfg.run.keep_checkpoints)
    if session.rank == 0:
        storage.makedirs(run_dir)
        storage.write_bytes(storage.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg).encode())
    with hdist.torch_threads(cfg.dist.cpus_per_worker):
        return Trainer(cfg, session).fit()


def init_local_process_group() -> None:
    """For debug mode and torchrun: a gloo/nccl group when WORLD_SIZE > 1, none otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
