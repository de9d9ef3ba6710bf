"""One rank's training machinery, the same for pretraining, full fine-tuning and linear probing:
the device, the strategy (DDP or DeepSpeed), mixed precision, the step (backward, gradient
clipping, optimiser, scheduler), checkpoints (model, optimiser, scheduler, RNG and a method's
per-rank state, e.g. its queue slice) and the metrics log (fault injection for tests: hncl.train.faults).

What is trained, on which data and with which loss is the caller's: `hncl.train.loop` for
pretraining (a Method from hncl/core/methods), `hncl.train.finetune` for fine-tuning and probing.

Checkpoint folder (one per saved step; written through a Session: Ray Train or a plain run
directory): model.safetensors, optimizer.pt, scheduler.pt if the caller has one (or DeepSpeed's
deepspeed/ folder, and with ZeRO >= 1 zero_consolidated.pt for a resume on another world size),
rng_rank{r}.json, {method.state_name}_rank{r}.pt for every rank, train_state.json, and what the
caller adds (pretraining: stream.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from hncl.config import Dtype, Strategy
from hncl.core import dist as hdist
from hncl.core.global_bn import convert_global_batchnorm
from hncl.errors import UserError
from hncl.infra import storage
from hncl.train import zero_state
from hncl.train.metrics import MetricsLog
from hncl.train.session import Session

_HALF = {Dtype.bfloat16: torch.bfloat16, Dtype.float16: torch.float16}


def device_for(dist_cfg) -> torch.device:
    """This rank's device: its local GPU with dist.use_gpu, else the CPU."""
    if dist_cfg.use_gpu:
        if not torch.cuda.is_available():
            raise UserError("dist.use_gpu=true but this worker sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": [x.tolist() if isinstance(x, np.ndarray) else x
                                                  for x in np.random.get_state()],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def deepspeed_config(dist_cfg, batch_size: int, grad_clip: Optional[float]) -> dict:
    precision = Dtype(dist_cfg.precision)
    ds = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": dist_cfg.zero_stage},
          # our own torch optimiser (SGD, AdamW, LARS) is handed to DeepSpeed; ZeRO partitions any
          # torch optimiser's state, but refuses those outside its own list unless told
          "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if grad_clip:
        ds["gradient_clipping"] = grad_clip
    # BatchNorm buffers must follow the half-precision parameters or the forward fails
    if precision is Dtype.bfloat16:
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    elif precision is Dtype.float16:
        ds["fp16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "fp16"}
    return ds


def prepare_model(model: torch.nn.Module, dist_cfg, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """Global-batch BatchNorm where asked (DDP over several ranks: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm elsewhere, since torch's refuses CPU tensors), on the device, channels_last
    on GPU."""
    if sync_bn and hdist.world_size() > 1 and Strategy(dist_cfg.strategy) is Strategy.ddp:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = convert_global_batchnorm(model)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def read_train_state(folder: str) -> dict:
    """A checkpoint's train_state.json (step, world size, strategy, the caller's own state)."""
    with open(os.path.join(folder, "train_state.json")) as f:
        return json.load(f)


class Engine:
    """Wraps `model` for this rank's strategy and steps it. `module` is what to call (DDP,
    the DeepSpeed engine, or the model); `model` stays the plain module (for its weights).

    dist_cfg: the config's dist section (strategy, precision, ZeRO stage); run_dir: where the
    metrics log and checkpoint messages point. strategy: dist_cfg.strategy unless given; alone:
    no wrapper whatever the strategy (one rank trains alone, e.g. a linear probe on rank 0). With
    a `session`, checkpoints go through it; with `log`, metrics go to the run directory's
    metrics.jsonl/csv and TensorBoard (rank 0)."""

    def __init__(self, dist_cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Optional[object],
                 device: torch.device,
                 *, run_dir: Optional[str] = None, batch_size: int = 1, grad_clip: Optional[float] = None,
                 strategy: Optional[Strategy] = None, alone: bool = False, session: Optional[Session] = None,
                 log: bool = False):
        self.dist_cfg, self.device = dist_cfg, device
        self.rank, self.world = hdist.rank(), hdist.world_size()
        self.strategy = Strategy(strategy or dist_cfg.strategy)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip
        self.deepspeed = None
        precision = Dtype(dist_cfg.precision)
        if not alone and self.strategy is Strategy.deepspeed:
            import deepspeed

            self.deepspeed, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(dist_cfg, batch_size, grad_clip), dist_init_required=False)
            self.module = self.deepspeed
        elif not alone and self.strategy is Strategy.ddp and self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.module = model
        self.autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None
        if device.type == "cuda" and precision in _HALF and self.deepspeed is None:
            self.autocast = lambda: torch.autocast("cuda", dtype=_HALF[precision])  # noqa: E731
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast and precision is Dtype.float16 else None
        # DeepSpeed's bf16/fp16 modes cast the weights, not the inputs: the inputs must follow
        self.input_dtype = _HALF.get(precision) if self.deepspeed is not None else None
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.session = session
        self.run_dir = run_dir
        self.log = MetricsLog(self.run_dir, enabled=self.rank == 0) if log else None

    # -- a step --------------------------------------------------------------------------------
    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch as the wrapped model takes it (dtype, memory format)."""
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        return x.contiguous(memory_format=torch.channels_last if self.device.type == "cuda"
                            else torch.contiguous_format)

    def step(self, loss: torch.Tensor, lr_factor: Optional[float] = None) -> None:
        """Backward, clip, optimiser step, scheduler step. With `lr_factor`, every parameter
        group's lr is its base lr (the optimiser's when the engine was made) times the factor
        for this step (a schedule the caller owns, e.g. in samples)."""
        if lr_factor is not None:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * lr_factor
        if self.deepspeed is not None:
            self.deepspeed.backward(loss)
            self.deepspeed.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        # the base lr: with layer-wise decay the first groups are the lowest layers, at a fraction of it
        return max(group["lr"] for group in self.optimizer.param_groups)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int, train_state: dict, metrics: Dict[str, float], method=None,
                        extra: Optional[Callable[[str], None]] = None) -> None:
        """Collective: every rank writes its files (and the caller's, with `extra(folder)`), the
        session commits them."""
        if self.log is not None:
            self.log.flush()

        def write(folder: str) -> None:
            r = self.rank
            if self.deepspeed is not None:
                self.deepspeed.save_checkpoint(folder, tag="deepspeed")
                if self._zero_partitioned():  # collective; what a resume on another world size loads
                    zero_state.save_consolidated(self.model, self.optimizer, os.path.join(folder, zero_state.FILE))
            elif r == 0:
                save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                          os.path.join(folder, "model.safetensors"))
                torch.save(self.optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
                if self.scheduler is not None:
                    torch.save(self.scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
            if method is not None and method.state_name:
                torch.save(method.state_dict(), os.path.join(folder, f"{method.state_name}_rank{r}.pt"))
            with open(os.path.join(folder, f"rng_rank{r}.json"), "w") as f:
                json.dump(rng_state(), f)
            if extra is not None:
                extra(folder)
            if r == 0:
                with open(os.path.join(folder, "train_state.json"), "w") as f:
                    json.dump({**train_state, "step": step, "world_size": self.world, "strategy": self.strategy.value,
                               "zero_stage": int(self.dist_cfg.zero_stage),
                               **({"method": method.name} if method is not None else {})}, f)

        self.session.save(step, write, {**metrics, "step": step})

    def restore_from(self, folder: str, method=None) -> dict:
        """Load a checkpoint folder (the session's restored() one) into the model, optimiser,
        scheduler, RNG and `method`'s per-rank state; returns its train_state.json. Works on
        another world size: the method's per-rank state is re-split, and a ZeRO-partitioned
        optimiser is loaded from the consolidated state saved beside DeepSpeed's own files."""
        state = read_train_state(folder)
        if state["strategy"] != self.strategy.value:
            raise UserError(f"checkpoint in {self.run_dir} was written with strategy {state['strategy']}; "
                            f"this run uses {self.strategy.value}. Use a new run.name.")
        if method is not None and state.get("method", method.name) != method.name:
            raise UserError(f"checkpoint in {self.run_dir} was written by method {state['method']}; this run "
                            f"uses {method.name}. Use a new run.name.")
        # the method's state first: its checks are cheap and say more than an optimiser's
        if method is not None and method.state_name:
            self._restore_method(method, folder, state["world_size"])
        if self.deepspeed is not None:
            consolidated = os.path.join(folder, zero_state.FILE)
            if state["world_size"] == self.world or not self._zero_partitioned():
                self.deepspeed.load_checkpoint(folder, tag="deepspeed")
            elif os.path.exists(consolidated):
                zero_state.load_consolidated(self.model, self.optimizer, consolidated)
            else:
                raise UserError(f"checkpoint {folder} was saved by {state['world_size']} ranks with ZeRO stage "
                                f"{state.get('zero_stage', '?')} and holds no consolidated optimiser state (an older "
                                f"hncl): resume it on {state['world_size']} ranks")
        else:
            with open(os.path.join(folder, "model.safetensors"), "rb") as f:  # read, not mmap: robust to
                weights = load_safetensors(f.read())                         # files replaced underneath
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=self.device,
                                                      weights_only=True))
            scheduler = os.path.join(folder, "scheduler.pt")
            if self.scheduler is not None and os.path.exists(scheduler):
                self.scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        rng = os.path.join(folder, f"rng_rank{self.rank}.json")
        if os.path.exists(rng) and state["world_size"] == self.world:  # another world: fresh ranks' RNGs
            with open(rng) as f:
                set_rng_state(json.load(f))
        if self.log is not None:
            self.log.truncate_after(state["step"])
        self._record_resume(state, method)
        return state

    def _zero_partitioned(self) -> bool:
        return self.deepspeed is not None and int(self.deepspeed.zero_optimization_stage()) >= 1

    def _restore_method(self, method, folder: str, saved_world: int) -> None:
        prefix = method.state_name
        files = [os.path.join(folder, f"{prefix}_rank{r}.pt") for r in range(saved_world)]
        missing = [os.path.basename(f) for f in files if not os.path.exists(f)]
        if missing:
            raise UserError(f"checkpoint {folder} lacks {', '.join(missing)} of the {saved_world} {prefix} slices "
                            f"its ranks saved")
        try:
            if saved_world == self.world:
                method.load_state_dict(torch.load(files[self.rank], weights_only=True))
                return
            # another world size: the slices are re-split, exactly (method.reshard says how)
            if self.rank == 0:
                print(f"[hncl] resuming {saved_world} ranks' run on {self.world}: the {prefix} is re-split over "
                      f"{self.world} ranks", flush=True)
            states = [torch.load(f, weights_only=True) for f in files]
            method.load_state_dict(method.reshard(states, self.world)[self.rank])
        except ValueError as e:  # the saved state does not fit this run's settings (the method says why)
            raise UserError(f"cannot resume from {folder}: {e}") from None

    def _record_resume(self, state: dict, method) -> None:
        """Append to resumes.jsonl which step the run came back from and a digest of every rank's
        restored method state (compare with hncl.core.queue.state_digest of the checkpoint's files)."""
        digests = hdist.gather_objects(method.digest() if method is not None else None)
        if self.rank == 0:
            url = storage.join(self.run_dir, "resumes.jsonl")
            old = storage.read_bytes(url).decode() if storage.exists(url) else ""
            line = json.dumps({"step": state["step"], "saved_world_size": state["world_size"], "world_size": self.world,
                               "queue_digests": digests, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            storage.write_bytes(url, (old + line + "\n").encode())

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def abort(self) -> None:
        """After a failure: drop local temporaries (the run directory keeps what was saved)."""
        if self.log is not None:
            self.log.discard()
