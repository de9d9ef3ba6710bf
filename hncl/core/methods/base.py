"""What every pretraining method is to the engine: a training step, and state of its own."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.profiler import record_function

from hncl.config import Dtype, MethodConfig
from hncl.core import dist as hdist
from hncl.core.queue import ShardedNeighborQueue, reshard_states

Batch = Dict[str, torch.Tensor]


class Method(abc.ABC):
    """A pretraining method: `training_step(batch) -> (this rank's loss, global metrics)`.

    batch: x1, x2 (two views [B, 3, H, W]), id [B] int64, label [B] (-1 = none), heatmap
    [B, 68, R, R] uint8 (or desc [B, Dh]). The model maps (x1, x2) -> (z1, p1, z2, p2):
    projections and predictions; it may be wrapped by DDP or DeepSpeed. State beyond the model's
    weights (a queue slice) is per rank: `state_dict()` is saved as `{state_name}_rank{r}.pt`.
    """

    name = ""
    state_name: Optional[str] = None  # None: nothing to checkpoint beyond the model
    Config = MethodConfig  # the method section's schema: a subclass adds the method's own options

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device | str = "cpu",
                 descriptor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None):
        self.model = model
        self.device = torch.device(device)
        self.temperature = float(cfg.method.temperature)
        self.descriptor = descriptor  # stored heatmaps -> descriptors, on the device
        # mixed precision for the network only: neighbour search and loss stay in float32
        self.autocast = autocast or contextlib.nullcontext

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, ...]:
        """z1, p1, z2, p2 of the two views, in float32 even under mixed precision."""
        with self.autocast(), record_function("hncl/model_forward"):
            outputs = self.model(batch["x1"], batch["x2"])
        return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in outputs)

    def descriptors(self, batch: Batch) -> torch.Tensor:
        with record_function("hncl/descriptor"):
            if "desc" in batch:
                return batch["desc"]
            if self.descriptor is None or "heatmap" not in batch:
                raise ValueError(f"{self.name} needs batch['desc'] or batch['heatmap'] plus a descriptor")
            return self.descriptor(batch["heatmap"])

    @abc.abstractmethod
    def training_step(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, float]]:
        """This rank's loss (mean over ranks = the global loss) and global metrics."""

    # -- per-rank state ----------------------------------------------------------------------
    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def reshard(self, states: List[dict], world_size: int) -> List[dict]:
        """The per-rank states of a run saved on another world size, re-split for this one."""
        raise NotImplementedError(f"{self.name} has no per-rank state to re-split")

    def digest(self) -> Optional[str]:
        """A fingerprint of this rank's state (written to resumes.jsonl on every resume)."""
        return None


@dataclass
class QueueConfig(MethodConfig):
    topk: int = 1  # each of the top-k valid queue neighbours is a positive
    queue_size: int = 65536  # global Q, split evenly over the W ranks
    queue_dtype: Dtype = Dtype.float32

    @staticmethod
    def validate(me, check) -> None:
        MethodConfig.validate(me, check)
        check(me.topk >= 1, "method.topk", me.topk, "must be >= 1")
        check(me.queue_size >= 1, "method.queue_size", me.queue_size, "must be >= 1")
        # the whole queue holds queue_size entries: more neighbours than that cannot be found
        check(me.topk <= me.queue_size, "method.topk", me.topk,
              f"must be <= method.queue_size={me.queue_size} (the neighbours are entries of the queue)")


class QueueMethod(Method):
    """A method that draws positives from a ShardedNeighborQueue (method.queue_size slots over
    all ranks, method.topk neighbours per query); the queue is its per-rank state."""

    state_name = "queue"
    Config = QueueConfig

    def __init__(self, cfg, model, key_dim: Optional[int] = None, **kwargs):
        super().__init__(cfg, model, **kwargs)
        me = cfg.method
        self.topk = int(me.topk)
        self.queue = ShardedNeighborQueue(me.queue_size, cfg.model.proj_out, key_dim,
                                          dtype=Dtype(me.queue_dtype).torch, device=self.device)

    def state_dict(self) -> dict:
        return self.queue.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.queue.load_state_dict(state)

    def reshard(self, states: List[dict], world_size: int) -> List[dict]:
        return reshard_states(states, world_size, self.queue.capacity)

    def digest(self) -> str:
        return self.queue.digest()

    def neighbour_metrics(self, n, labels: Optional[torch.Tensor], batch_pos: Optional[torch.Tensor] = None,
                          batch_weights: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Queue fill, mean neighbour score and (labels known) the label purity of the queue's and
        the in-batch positives, global (one all-reduce); weighted positives count by their weight."""
        valid = n.valid
        stats = [valid.sum(), torch.where(valid, n.scores, torch.zeros_like(n.scores)).sum(),
                 (self.queue.ids >= 0).sum()]
        if labels is not None:
            labels = labels.to(n.labels.device)
            known = valid & (n.labels >= 0) & (labels.unsqueeze(1) >= 0)
            stats += [known.sum(), (known & (n.labels == labels.unsqueeze(1))).sum()]
            if batch_pos is not None:
                mine = labels.to(batch_pos.device)
                pos_labels = torch.where(batch_pos >= 0, hdist.all_gather_rows(mine)[batch_pos.clamp(min=0)], -1)
                known_b = (pos_labels >= 0) & (mine.unsqueeze(1) >= 0)
                weight = known_b.double() if batch_weights is None else batch_weights.double() * known_b
                stats += [weight.sum(), (weight * (pos_labels == mine.unsqueeze(1))).sum()]
        s = hdist.all_reduce_sum(torch.stack([t.double() for t in stats]))
        out = {"queue_fill": float(s[2]) / self.queue.capacity,
               "nn_score": float(s[1] / s[0]) if s[0] > 0 else float("nan")}
        if labels is not None:
            out["nn_purity"] = float(s[4] / s[3]) if s[3] > 0 else float("nan")
            if batch_pos is not None:
                out["batch_nn_purity"] = float(s[6] / s[5]) if s[5] > 0 else float("nan")
        return out
