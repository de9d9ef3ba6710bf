"""Which reader trains on which samples of a data epoch, in which order, and where the stream is.

A data epoch is every sample of the set once, over all readers (ranks x loader workers). Epoch
e's sequence: the set's shards in an order shuffled with (seed, e), each shard's samples in their
order, less the samples that were already trained on in e before a resume on another number of
readers (`excluded`). The sequence is cut into one contiguous span per reader, all of one length
but for one extra sample that goes to the readers in turn across epochs (so no reader drifts
ahead of another by more than a sample); each span is shuffled in blocks of `block` consecutive
samples (the shuffle buffer: a block is read in sequence order, then emitted permuted).

The stream position is, per reader, (epoch, samples of that epoch's plan emitted). Everything
here is computed from the manifest's sample counts: finding a position reads no image, and a
resume on another number of readers knows exactly which samples of the interrupted epoch were
trained on (compare MosaicML Streaming's deterministic, elastic sample partitions).

Samples are named by their *position* in the set: shard i's j-th sample is offsets[i] + j, with
the shards in manifest order.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

VERSION = 1


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % 2**32 for k in key])


@dataclass
class EpochPlan:
    """One data epoch's deal: `readers` spans of the epoch's sequence, shuffled in blocks."""

    counts: Sequence[int]  # samples per shard, manifest order (shards with samples only)
    seed: int
    epoch: int
    readers: int
    block: int
    excluded: Optional[np.ndarray] = None  # bool per position: trained on before a resume

    def sequence(self) -> np.ndarray:
        """The epoch's positions in shard-shuffled order, the excluded ones left out."""
        counts = np.asarray(self.counts, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        order = _rng(self.seed, self.epoch, 0x5EED).permutation(len(counts))
        seq = np.concatenate([np.arange(offsets[i], offsets[i] + counts[i]) for i in order]) \
            if len(counts) else np.zeros(0, dtype=np.int64)
        if self.excluded is not None:
            seq = seq[~self.excluded[seq]]
        return seq

    def span_bounds(self, total: int) -> List[Tuple[int, int]]:
        """[start, stop) of every reader's span in a sequence of `total` samples. The remainder's
        extra samples go to the readers that follow the previous epoch's (dealt in turn)."""
        base, extra = divmod(total, self.readers)
        first = (self.epoch * extra) % self.readers
        sizes = [base + (1 if (r - first) % self.readers < extra else 0) for r in range(self.readers)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return [(int(s), int(s) + n) for s, n in zip(starts, sizes)]

    def span(self, reader: int, seq: Optional[np.ndarray] = None) -> np.ndarray:
        """Reader `reader`'s positions, in sequence (= reading) order."""
        seq = self.sequence() if seq is None else seq
        start, stop = self.span_bounds(len(seq))[reader]
        return seq[start:stop]

    def block_order(self, reader: int, index: int, size: int) -> np.ndarray:
        """The emission order of block `index` of the reader's span (a permutation of its size)."""
        return _rng(self.seed, self.epoch, reader, self.readers, index).permutation(size)

    def emission(self, reader: int, span: Optional[np.ndarray] = None) -> np.ndarray:
        """The reader's positions in the order it emits them."""
        span = self.span(reader) if span is None else span
        parts = [span[b:b + self.block][self.block_order(reader, b // self.block, len(span[b:b + self.block]))]
                 for b in range(0, len(span), self.block)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def to_json(self) -> dict:
        out = {"readers": self.readers, "block": self.block}
        if self.excluded is not None:
            out["excluded"] = base64.b64encode(zlib.compress(np.packbits(self.excluded).tobytes())).decode()
        return out

    @classmethod
    def from_json(cls, d: dict, counts: Sequence[int], seed: int, epoch: int) -> "EpochPlan":
        excluded = None
        if "excluded" in d:
            bits = np.frombuffer(zlib.decompress(base64.b64decode(d["excluded"])), dtype=np.uint8)
            excluded = np.unpackbits(bits)[:int(sum(counts))].astype(bool)
        return cls(counts, seed, epoch, int(d["readers"]), int(d["block"]), excluded)


@dataclass
class StreamState:
    """Where every reader of the training stream is: `positions[r]` = (data epoch, samples of
    that epoch's plan emitted) and, for epochs in progress whose deal differs from the default
    (made after a resume on another number of readers), their plans. `turn` is which of a rank's
    loader workers delivers its next batch (the DataLoader takes them in turn)."""

    counts: List[int]
    seed: int
    readers: int
    block: int
    positions: List[Tuple[int, int]]
    plans: Dict[int, EpochPlan] = field(default_factory=dict)
    turn: int = 0

    @classmethod
    def start(cls, counts: Sequence[int], seed: int, readers: int, block: int, epoch: int = 0) -> "StreamState":
        return cls(list(map(int, counts)), int(seed), readers, max(1, int(block)), [(epoch, 0)] * readers)

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def plan(self, epoch: int) -> EpochPlan:
        if epoch in self.plans:
            return self.plans[epoch]
        return EpochPlan(self.counts, self.seed, epoch, self.readers, self.block)

    def trained(self, epoch: int) -> np.ndarray:
        """bool per position: which samples of `epoch` the readers have emitted."""
        done = np.zeros(self.num_samples, dtype=bool)
        plan = self.plan(epoch)
        if plan.excluded is not None:
            done |= plan.excluded
        seq = plan.sequence()
        bounds = plan.span_bounds(len(seq))
        for reader, (e, k) in enumerate(self.positions):
            if e < epoch:
                continue
            span = seq[bounds[reader][0]:bounds[reader][1]]
            done[span if e > epoch else plan.emission(reader, span)[:k]] = True
        return done

    def resized(self, readers: int, block: Optional[int] = None) -> "StreamState":
        """The same position dealt to `readers` readers: what remains of each epoch in progress is
        split among them, each sample once; later epochs follow the new number of readers."""
        block = self.block if block is None else max(1, int(block))
        first = min(e for e, _ in self.positions)
        # epochs some reader is in, and later ones an earlier resize dealt anew (their exclusions stay)
        last = max([e for e, _ in self.positions] + [e for e in self.plans if e >= first])
        plans = {}
        for epoch in range(first, last + 1):
            done = self.trained(epoch)
            if done.any():
                plans[epoch] = EpochPlan(self.counts, self.seed, epoch, readers, block, done)
        return StreamState(self.counts, self.seed, readers, block, [(first, 0)] * readers, plans, 0)

    def reblocked(self, block: int) -> "StreamState":
        """The same position with another shuffle block from the next data epoch on: the epochs
        readers are in keep the deal their positions count in."""
        block = max(1, int(block))
        if block == self.block:
            return self
        plans = dict(self.plans)
        for epoch in range(min(e for e, _ in self.positions), max(e for e, _ in self.positions) + 1):
            plans.setdefault(epoch, self.plan(epoch))
        return StreamState(self.counts, self.seed, self.readers, block, list(self.positions), plans, self.turn)

    def to_json(self) -> dict:
        live = {e: p for e, p in self.plans.items() if e >= min(e for e, _ in self.positions)}
        return {"version": VERSION, "counts": self.counts, "seed": self.seed, "readers": self.readers,
                "block": self.block, "positions": [list(p) for p in self.positions], "turn": self.turn,
                "plans": {str(e): p.to_json() for e, p in live.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "StreamState":
        if d.get("version") != VERSION:
            raise ValueError(f"stream state version {d.get('version')} (this hncl reads {VERSION})")
        counts, seed = [int(c) for c in d["counts"]], int(d["seed"])
        plans = {int(e): EpochPlan.from_json(p, counts, seed, int(e)) for e, p in d["plans"].items()}
        return cls(counts, seed, int(d["readers"]), int(d["block"]), [tuple(p) for p in d["positions"]],
                   plans, int(d.get("turn", 0)))
