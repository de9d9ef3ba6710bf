"""The neighbour queue, sharded over ranks: the support set HNCL draws extra positives from.

Global capacity Q is split over the W ranks of the process group; rank r holds slots
[r*Q/W, (r+1)*Q/W) of one logical queue, so memory per rank is Q/W and the support set grows
with the cluster. Each slot: a search key (with key_dim: e.g. a heatmap descriptor; without:
the stored embedding itself is the key), a stored embedding (L2-normalised, no gradient), a
sample id (-1 = empty) and a label (-1 = unknown; only used for the neighbour-purity metric).
The queue does not know which method uses it.

lookup() returns exactly what one process holding the union of the slices would return:
  1. all-gather the queries (every rank searches its slice for everybody's queries),
  2. cosine scores against the local slice in one matmul, masking empty slots and the query's
     own sample id, then the local top-k,
  3. exchange candidates so each rank gets its own queries' candidates from every slice
     (all_to_all, or all_gather where the backend lacks it),
  4. merge to the global top-k, ordered by (score desc, global slot index asc).
The guarantee holds *exactly*, ties included: a batched matmul may round the scores of two
identical keys 1-2 ulp apart (the BLAS kernel treats columns differently by position) and
differently on a slice than on the union, so the matmul only *selects* candidates; every
ordering decision uses the pair's score recomputed on its own ((q * key).sum(), the same
arithmetic wherever the key sits), and a row whose cut-off is within the matmul's rounding
bound of a non-candidate is re-decided over every column inside that bound. Identical keys
therefore tie exactly and the lowest global slot wins, for any W.
enqueue() writes FIFO into the local slice only: no communication. Keys, values and queries
are normalised in the queue's own precision (at least float32; float64 queues in float64).

Deliberately NOT an nn.Module and holding no registered buffers: DDP broadcasts module buffers
from rank 0 on every forward, which would overwrite every rank's slice with rank 0's. Being a
plain object, it cannot be wrapped, broadcast or silently saved inside the model's state_dict;
it is checkpointed per rank with its own state_dict().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hncl.core import dist as hdist
from hncl.core.topk import top_k_exact

_NO_INDEX = torch.iinfo(torch.int64).max  # sorts invalid candidates after every real slot


@dataclass
class Neighbours:
    """lookup() result for B queries and k neighbours. Invalid entries: embedding 0, score
    -inf, id/label/slot -1."""

    embeddings: torch.Tensor  # [B, k, De]
    scores: torch.Tensor  # [B, k] cosine similarity in search space
    valid: torch.Tensor  # [B, k] bool
    ids: torch.Tensor  # [B, k] int64 sample ids of the neighbours
    labels: torch.Tensor  # [B, k] int64 labels of the neighbours (-1 unknown)
    slots: torch.Tensor  # [B, k] int64 global slot index


class ShardedNeighborQueue:
    """See the module docstring. Construct after torch.distributed is initialised (or with no
    process group at all for a single process)."""

    def __init__(
        self,
        capacity: int,
        value_dim: int,
        key_dim: Optional[int] = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        exchange: str = "auto",
        key_space: Optional[str] = None,
    ):
        """key_dim: size of separate search keys (e.g. heatmap descriptors); None: the stored
        embeddings are searched (NNCLR). key_space: names the space the keys live in when it is
        not the default one (e.g. a whitened descriptor): checkpoints of another space are refused,
        since their keys would be compared with this run's as if they were alike."""
        if exchange not in ("auto", "all_to_all", "all_gather"):
            raise ValueError(f"exchange must be auto, all_to_all or all_gather, got {exchange!r}")
        self.world_size, self.rank = hdist.world_size(), hdist.rank()
        if capacity % self.world_size != 0:
            raise ValueError(
                f"queue capacity {capacity} is not divisible by the world size {self.world_size}: "
                f"each rank holds capacity/world_size slots")
        self.capacity = capacity
        self.slots = capacity // self.world_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.exchange = exchange
        self.key_space = key_space
        # without key_dim the search keys are the stored embeddings: no second copy
        self.keys = torch.zeros(self.slots, key_dim, dtype=dtype, device=self.device) if key_dim else None
        self.values = torch.zeros(self.slots, value_dim, dtype=dtype, device=self.device)
        self.ids = torch.full((self.slots,), -1, dtype=torch.int64, device=self.device)
        self.labels = torch.full((self.slots,), -1, dtype=torch.int64, device=self.device)
        self.ptr = 0
        self._full = False  # every slot holds an entry (then lookup skips the empty-slot mask)

    # -- state -------------------------------------------------------------------------------
    @property
    def search_keys(self) -> torch.Tensor:
        return self.keys if self.keys is not None else self.values

    def fill_fraction(self) -> float:
        """Fraction of the global queue holding entries (one all-reduce)."""
        filled = hdist.all_reduce_sum((self.ids >= 0).sum().reshape(1))
        return float(filled.item()) / self.capacity

    def _compute_dtype(self) -> torch.dtype:
        # Half-precision matmuls are fast on GPU; on CPU they are slow, so widen there.
        if self.device.type == "cuda":
            return self.dtype
        return torch.promote_types(self.dtype, torch.float32)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised rows in the queue's precision (at least float32: a float64 queue is
        float64-precise, not float32-precise)."""
        return F.normalize(x.detach().to(self.device, torch.promote_types(self.dtype, torch.float32)), dim=1)

    # -- enqueue -----------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, keys: Optional[torch.Tensor], values: torch.Tensor, ids: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> None:
        """FIFO-write a local batch into the local slice. Any batch size works: indices wrap,
        and when B exceeds the slice only the newest Q/W rows are kept."""
        b = values.shape[0]
        if b == 0:
            return
        if labels is None:
            labels = torch.full((b,), -1, dtype=torch.int64, device=values.device)
        rows = torch.arange(b, device=self.device)
        if b > self.slots:
            rows = rows[b - self.slots:]
        dest = (self.ptr + rows) % self.slots
        self.values[dest] = self._normalised(values)[rows].to(self.dtype)
        if self.keys is not None:
            if keys is None:
                raise ValueError("this queue searches by separate keys: enqueue needs them (e.g. heatmap descriptors)")
            self.keys[dest] = self._normalised(keys)[rows].to(self.dtype)
        self.ids[dest] = ids.to(self.device, torch.int64)[rows]
        self.labels[dest] = labels.to(self.device, torch.int64)[rows]
        self.ptr = int((self.ptr + b) % self.slots)
        if not self._full:
            self._full = bool((self.ids >= 0).all())

    # -- lookup ------------------------------------------------------------------------------
    @torch.no_grad()
    def lookup(self, queries: torch.Tensor, ids: torch.Tensor, k: int = 1) -> Neighbours:
        """Global top-k neighbours of each local query among all ranks' slots (collective:
        every rank must call it, with its own batch)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        b = queries.shape[0]
        cdtype = self._compute_dtype()
        q = self._normalised(queries).to(cdtype)
        ids = ids.to(self.device, torch.int64)
        sizes = hdist.gather_sizes(b, self.device)
        q_all = hdist.all_gather_rows(q, sizes)
        ids_all = hdist.all_gather_rows(ids, sizes)

        # 2. local scores and top-k (k' <= slots)
        keys = self.search_keys.to(cdtype)
        scores = q_all @ keys.T  # [N, slots]: selects candidates; top_k_exact orders them
        if not self._full:  # once every slot holds an entry, skip the [N, slots] mask
            scores.masked_fill_((self.ids < 0).unsqueeze(0), float("-inf"))
        # a query's own sample id (an earlier epoch's copy): compare only on the slots holding one
        sorted_ids = ids_all.sort().values  # (torch.isin sorts the whole slice: far slower)
        at = torch.searchsorted(sorted_ids, self.ids).clamp(min=0, max=max(0, sorted_ids.numel() - 1))
        own = (sorted_ids[at] == self.ids).nonzero().squeeze(1) if sorted_ids.numel() else at[:0]
        if own.numel():
            same = ids_all.unsqueeze(1) == self.ids[own].unsqueeze(0)  # [N, hits]
            scores[:, own] = scores[:, own].masked_fill(same, float("-inf"))
        val, slot = top_k_exact(q_all, keys, scores, k)  # [N, k']
        ok = torch.isfinite(val)
        slot = torch.where(ok, slot, torch.zeros_like(slot))
        gidx = torch.where(ok, slot + self.rank * self.slots, torch.full_like(slot, _NO_INDEX))
        emb = self.values[slot].to(cdtype) * ok.unsqueeze(-1)
        fpay = torch.cat([val.unsqueeze(-1), emb], dim=-1)  # [N, k', 1+De]
        ipay = torch.stack([gidx,
                            torch.where(ok, self.ids[slot], torch.full_like(slot, -1)),
                            torch.where(ok, self.labels[slot], torch.full_like(slot, -1))], dim=-1)

        # 3. exchange: rows of our own queries, from every rank
        if self.world_size > 1:
            fpay, ipay = self._exchange(fpay, sizes), self._exchange(ipay, sizes)  # [W, b, k', .]
            width = self.world_size * fpay.shape[2]  # candidates per query from all ranks (b may be 0)
            fpay = fpay.permute(1, 0, 2, 3).reshape(b, width, fpay.shape[-1])
            ipay = ipay.permute(1, 0, 2, 3).reshape(b, width, 3)

        # 4. merge: order by (score desc, global slot asc), keep k
        cand_s, cand_g = fpay[..., 0], ipay[..., 0]
        cand_g, order = cand_g.sort(dim=1)
        cand_s = cand_s.gather(1, order)
        cand_s, order2 = cand_s.sort(dim=1, descending=True, stable=True)
        order = order.gather(1, order2)[:, :k]
        take = lambda t: t.gather(1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        fsel, isel = take(fpay), take(ipay)
        valid = torch.isfinite(fsel[..., 0])
        if order.shape[1] < k:  # fewer slots in the whole queue than k
            pad = k - order.shape[1]
            fsel = torch.cat([fsel, fsel.new_zeros(b, pad, fsel.shape[-1])], 1)
            fsel[:, -pad:, 0] = float("-inf")
            isel = torch.cat([isel, isel.new_full((b, pad, 3), -1)], 1)
            valid = torch.cat([valid, valid.new_zeros(b, pad)], 1)
        slots = torch.where(valid, isel[..., 0], torch.full_like(isel[..., 0], -1))
        return Neighbours(embeddings=fsel[..., 1:], scores=fsel[..., 0], valid=valid,
                          ids=isel[..., 1], labels=isel[..., 2], slots=slots)

    def _exchange(self, payload: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """payload [N, ...] holds candidates for every rank's queries in rank order; returns
        [W, b_local, ...]: the rows for our own queries from each rank."""
        b = sizes[self.rank]
        if self.exchange in ("auto", "all_to_all"):
            out = payload.new_empty((self.world_size * b,) + tuple(payload.shape[1:]))
            try:
                dist.all_to_all_single(out, payload.contiguous(), output_split_sizes=[b] * self.world_size,
                                       input_split_sizes=list(sizes))
                return out.reshape((self.world_size, b) + tuple(payload.shape[1:]))
            except RuntimeError:
                if self.exchange == "all_to_all":
                    raise
                self.exchange = "all_gather"  # backend lacks all_to_all: remember and fall back
        parts = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(parts, payload.contiguous())
        start = sum(sizes[: self.rank])
        return torch.stack([p[start:start + b] for p in parts])

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """This rank's slice only: save it as queue_rank{r}.pt."""
        state = {"capacity": self.capacity, "world_size": self.world_size, "rank": self.rank, "ptr": self.ptr,
                 "keys": None if self.keys is None else self.keys.cpu().clone(),
                 "values": self.values.cpu().clone(), "ids": self.ids.cpu().clone(),
                 "labels": self.labels.cpu().clone()}
        if self.key_space is not None:  # (absent = the default space: checkpoints from before it stay valid)
            state["key_space"] = self.key_space
        return state

    def digest(self) -> str:
        """sha256 of this slice's contents: equal digests = identical slices (for resume checks)."""
        return state_digest(self.state_dict())

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for name, mine in (("capacity", self.capacity), ("world_size", self.world_size)):
            if state[name] != mine:
                raise ValueError(
                    f"queue checkpoint has {name}={state[name]!r} but this run has {name}={mine!r}; "
                    f"re-shard it explicitly with hncl.core.queue.reshard_states(states, world_size, capacity)")
        if state["rank"] != self.rank:
            raise ValueError(f"queue checkpoint is rank {state['rank']}'s slice; this is rank {self.rank} "
                             f"(load queue_rank{self.rank}.pt)")
        if state["values"].shape != self.values.shape:  # type: ignore[union-attr]
            raise ValueError(f"queue checkpoint embeddings have shape {tuple(state['values'].shape)}, "  # type: ignore[union-attr]
                             f"expected {tuple(self.values.shape)}")
        if (state["keys"] is None) != (self.keys is None):
            raise ValueError("queue checkpoint " + ("searches its stored embeddings" if state["keys"] is None else
                                                    "has separate search keys") + "; this run's queue does not "
                             "(a checkpoint of another method)")
        if state.get("key_space") != self.key_space:
            raise ValueError(f"queue checkpoint keys are {state.get('key_space') or 'the default descriptor'}; this run's are "
                             f"{self.key_space or 'the default descriptor'}: resume with the setting the run started "
                             "with (or start a new run)")
        if self.keys is not None:
            if state["keys"].shape != self.keys.shape:  # type: ignore[union-attr]
                raise ValueError("queue checkpoint descriptors do not match this run's descriptor size")
            self.keys.copy_(state["keys"])  # type: ignore[arg-type]
        self.values.copy_(state["values"])  # type: ignore[arg-type]
        self.ids.copy_(state["ids"])  # type: ignore[arg-type]
        self.labels.copy_(state["labels"])  # type: ignore[arg-type]
        self.ptr = int(state["ptr"])  # type: ignore[arg-type]
        self._full = bool((self.ids >= 0).all())


def state_digest(state: Dict[str, object]) -> str:
    import hashlib

    h = hashlib.sha256(f"{state['capacity']}/{state['world_size']}/{state['rank']}/{state['ptr']}".encode())
    for name in ("keys", "values", "ids", "labels"):
        t = state[name]
        if t is not None:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())  # type: ignore[union-attr]
    return h.hexdigest()


def reshard_states(states: Sequence[Dict[str, object]], world_size: int,
                   capacity: Optional[int] = None) -> List[Dict[str, object]]:
    """Re-split the per-rank queue checkpoints of one run for a new world size (and capacity).

    Entries are taken oldest first from every old slice (interleaved, so the newest entries of
    every old rank survive a shrink), the newest `capacity` kept, and dealt out in contiguous
    blocks so each new slice is again a FIFO with its oldest entry at its write pointer.
    """
    states = sorted(states, key=lambda s: s["rank"])  # type: ignore[arg-type,return-value]
    old_w = states[0]["world_size"]
    if len(states) != old_w or [s["rank"] for s in states] != list(range(old_w)):  # type: ignore[arg-type]
        raise ValueError(f"need all {old_w} slices (ranks 0..{old_w - 1}) to re-shard")
    capacity = capacity if capacity is not None else int(states[0]["capacity"])  # type: ignore[arg-type]
    if capacity % world_size:
        raise ValueError(f"capacity {capacity} is not divisible by world size {world_size}")
    per_rank = []
    for s in states:  # oldest-first order of each slice: ptr..end, then 0..ptr-1
        n = s["ids"].shape[0]  # type: ignore[union-attr]
        order = (torch.arange(n) + int(s["ptr"])) % n  # type: ignore[arg-type]
        order = order[s["ids"][order] >= 0]  # type: ignore[index]
        per_rank.append(order)
    entries = []  # (age position, old rank, old slot)
    for r, order in enumerate(per_rank):
        rel = len(order)
        for j, slot in enumerate(order.tolist()):
            entries.append(((j + 1) / rel, r, slot))
    entries.sort()
    entries = entries[-capacity:]
    slots = capacity // world_size
    has_keys = states[0]["keys"] is not None
    out = []
    for r in range(world_size):
        block = entries[r * slots:(r + 1) * slots]
        vals = states[0]["values"]
        new = {"capacity": capacity, "world_size": world_size, "rank": r, "ptr": len(block) % slots,
               "values": torch.zeros(slots, vals.shape[1], dtype=vals.dtype),  # type: ignore[union-attr]
               "keys": (torch.zeros(slots, states[0]["keys"].shape[1], dtype=vals.dtype)  # type: ignore[union-attr]
                        if has_keys else None),
               "ids": torch.full((slots,), -1, dtype=torch.int64),
               "labels": torch.full((slots,), -1, dtype=torch.int64)}
        if "key_space" in states[0]:
            new["key_space"] = states[0]["key_space"]
        for j, (_, old_r, old_slot) in enumerate(block):
            src = states[old_r]
            new["values"][j] = src["values"][old_slot]  # type: ignore[index]
            if has_keys:
                new["keys"][j] = src["keys"][old_slot]  # type: ignore[index]
            new["ids"][j] = src["ids"][old_slot]  # type: ignore[index]
            new["labels"][j] = src["labels"][old_slot]  # type: ignore[index]
        out.append(new)
    return out
