"""Streaming reader for shard sets (local folders or s3:// URLs), built on webdataset stages.

Training mode: an endless sequence of data epochs, dealt out to the readers (rank x loader
worker, across every node) by hncl/data/epoch_plan.py: each reader gets one contiguous span of
the epoch's shard-shuffled sequence, all spans of one length, each shuffled in blocks of the
shuffle buffer; so each sample of an epoch is read by exactly one reader and all readers finish
an epoch within a sample of each other. A reader starts where the stream state says (a resumed
run: the checkpoint's position; shards before it are not opened, tar members before it in its
shard are read but not decoded), then goes on with its share of the next epoch: the stream never
ends, so every rank takes the same number of fixed-size batches and no collective waits. Batches
carry where their reader is after them, which the training loop saves with each checkpoint.
Evaluation mode: every sample exactly once, split by rank and loader worker, the last batch
partial.

Both shard formats are read (hncl/data/shard_format.py): v1's four members per sample and v2's
one; both decode to the same sample. A set in any other format is refused when it is opened.

Lost data is skipped, not fatal, and counted in *samples*: a corrupt sample is one; a shard that
cannot be read (missing object, S3 unreachable after hncl.infra.storage's retries, access denied) or
that breaks off early (truncated, cut connection) loses the samples its manifest says it holds
beyond those delivered. Every batch carries the counts its worker accumulated since its previous
batch by reason (`batch["skipped"]`) and where (`batch["skipped_where"]`: shards or samples),
which the training loop sums and checks against data.max_skip_fraction. A stream that delivers
nothing stops with one line: when every shard of the set has failed in a row, or when no sample
arrived for `stall_timeout_s` seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import json
import logging
import tarfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional speed-up; PIL decodes everything
    simplejpeg = None

from hncl.data.epoch_plan import EpochPlan, StreamState
from hncl.data.shard_format import V2_SUFFIX, CorruptSample, check_format, decode_v2
from hncl.errors import InputError, UserError
from hncl.heatmaps.descriptor import HeatmapDescriptor
from hncl.infra import storage

log = logging.getLogger(__name__)


def _s3_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return storage.open_stream(url)


# webdataset opens URLs through its gopen table; route s3:// through hncl.infra.storage (s3fs with
# timeouts and retries; no shell pipes)
importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _s3_gopen


class DataStall(UserError):
    """The shard stream delivers nothing: every shard fails, or nothing arrived for too long."""


class SkipCounter:
    """Per-process counts of lost samples by reason, with where (shard or sample); also a
    webdataset exception handler (one sample per call)."""

    EXAMPLES = 8

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {}
        self._where: Dict[str, List[str]] = {}

    def lost(self, reason: str, where: str, samples: int) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + samples
            seen = self._where.setdefault(reason, [])
            if where not in seen and len(seen) < self.EXAMPLES:
                seen.append(where)

    def handler(self, exn: Exception) -> bool:
        self.lost(_reason(exn), str(getattr(exn, "where", "")) or str(exn)[:200], 1)
        log.warning("skipped (%s): %s", _reason(exn), str(exn)[:300])
        return True  # keep going

    def take(self) -> Dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def take_where(self) -> Dict[str, List[str]]:
        with self._lock:
            where, self._where = self._where, {}
        return where


def _reason(exn: BaseException) -> str:
    """What a failure means for the data, in the words the counts and messages use."""
    if isinstance(getattr(exn, "reason", None), str):  # CorruptSample knows what it is
        return exn.reason
    if isinstance(exn, (storage.MissingObject, FileNotFoundError)):
        return "missing shard"
    if isinstance(exn, storage.StorageError):
        return {storage.Unreachable: "S3 unreachable", storage.AccessDenied: "S3 access denied",
                storage.MissingBucket: "S3 bucket missing"}.get(type(exn), "storage error")
    if isinstance(exn, (tarfile.TarError, EOFError)) or storage.is_transient(exn):
        return "truncated or unreadable shard"
    text = f"{type(exn).__name__} {exn}".lower()
    if "jpeg" in text or "image" in text or "decode" in text:
        return "corrupt image"
    if isinstance(exn, KeyError):
        return "incomplete sample"
    return "corrupt sample"


class ShardSamples:
    """Shard URLs (webdataset's {"url": ...} items) -> raw samples (dicts of tar members), each
    shard checked against the manifest's sample count: what it fails to deliver is counted as
    lost samples, by reason (see the module docstring). Replaces wds.tarfile_to_samples."""

    def __init__(self, shards: "ShardSet", counter: SkipCounter, stall_timeout_s: float = 600.0):
        self.expected = shards.sample_counts
        self.root = shards.root
        self.counter = counter
        self.stall_timeout_s = stall_timeout_s
        self._last_delivery: Optional[float] = None  # since when this reader has been waiting for data
        self._failing: set = set()  # shards that failed in a row without delivering a sample
        self._empty_reads = 0  # shards read in a row that delivered nothing
        self.last_failure: Optional[str] = None  # the last shard that delivered nothing, and why

    def _samples(self, url: str) -> Iterator[dict]:
        stream = storage.open_stream(url) if storage.is_remote(url) else open(url, "rb")
        try:
            files = wds.tariterators.tar_file_iterator(stream)
            yield from wds.tariterators.group_by_keys(dict(f, __url__=url) for f in files)
        finally:
            stream.close()

    def _read(self, url: str, progress: list) -> Iterator[dict]:
        """The shard's samples; a transient failure mid-read (a cut connection) reopens it and
        skips what was delivered: nothing lost, nothing twice. Failures in a row are retried for
        HNCL_S3_DEADLINE from the first of them, not from the open: a reader advances only as fast
        as training consumes, so its later requests come long after the open.
        progress[0] counts the samples delivered."""
        failing_since, delivered_then, delay = None, -1, 0.5
        while True:
            try:
                for i, sample in enumerate(self._samples(url)):
                    if i >= progress[0]:
                        progress[0] += 1
                        yield sample
                return
            except Exception as e:
                if progress[0] != delivered_then:  # a new failure, after data flowed again
                    failing_since, delivered_then, delay = time.monotonic(), progress[0], 0.5
                final = isinstance(e, storage.StorageError) or not storage.is_transient(e)
                deadline = failing_since + storage.setting("HNCL_S3_DEADLINE")
                if final or not storage.is_remote(url) or time.monotonic() + delay > deadline:
                    raise
                log.warning("reading %s broke off after %d samples (%s): reopening", url, progress[0], e)
                time.sleep(delay)
                delay = min(2 * delay, 8.0)

    def read(self, url: str, wanted: Optional[np.ndarray] = None) -> Iterator[dict]:
        """One shard's samples, or those at the sorted indices `wanted` (a reader's share of the
        shard: the members before and between them are skipped, not decoded, and reading stops
        after the last). Each sample carries its index in the shard (`__index__`); what the shard
        fails to deliver of the share is counted as lost."""
        if self._last_delivery is None or self._empty_reads == 0:
            self._last_delivery = time.monotonic()  # asked for data now; not waiting before
        total = self.expected.get(url, 0) if wanted is None else len(wanted)
        last = None if wanted is None else (int(wanted[-1]) if len(wanted) else -1)
        keep = None if wanted is None else set(int(j) for j in wanted)
        progress, error, delivered = [0], None, 0
        try:
            for j, sample in enumerate(self._read(url, progress)):
                if last is not None and j > last:
                    break
                if keep is None or j in keep:
                    delivered += 1
                    sample["__index__"] = j
                    yield sample
                    # the consumer asks for more: only from now on is this reader waiting for data
                    # (time spent training on what it had, a long checkpoint, is not a stall)
                    self._last_delivery = time.monotonic()
                if last is not None and j == last:
                    break
        except Exception as e:  # every failure is counted, named, and the stream goes on
            error = storage.explain(e, url, "reading") or e
        lost = total - delivered
        self._empty_reads = 0 if delivered or (error is None and lost <= 0) else self._empty_reads + 1
        if error is None and lost <= 0:
            self._failing.clear()
            return
        reason = _reason(error) if error is not None else "truncated or unreadable shard"
        name = url.rsplit("/", 1)[-1]
        self.counter.lost(reason, name, max(lost, 0))
        log.warning("%s: %s lost %d of %d samples (%s)", reason, url, max(lost, 0), total,
                    str(error)[:300] if error is not None else "the shard ended early")
        if delivered == 0:
            self._failing.add(url)
            self.last_failure = f"{reason} on {name}: " + \
                (str(error) if error is not None else "ended early").splitlines()[0][:300]
        stalled = time.monotonic() - self._last_delivery
        if len(self._failing) >= len(self.expected) or stalled > self.stall_timeout_s:
            what = (f"none of the {len(self.expected)} shards could be read" if len(self._failing) >= len(self.expected)
                    else f"no sample arrived for {stalled:.0f} s (data.stall_timeout_s={self.stall_timeout_s:g})")
            raise DataStall(f"{self.root}: {what}; last: {reason} on {name}: "
                            f"{(str(error) if error is not None else 'ended early').splitlines()[0][:300]}")

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for item in src:
            yield from self.read(item["url"])


_NPY_HEADERS: Dict[bytes, tuple] = {}  # raw .npy header -> (dtype, shape, fortran_order)


def read_npy(data: bytes) -> np.ndarray:
    """np.load for the small .npy members of a shard, without its per-call header parse
    (ast.literal_eval: most of its cost). Every sample of a set shares one header, so it is
    parsed once by numpy's own reader and remembered; the array is a copy of the buffer."""
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        raise ValueError("not a .npy array (or an unsupported .npy version)")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    header_end = start + int.from_bytes(data[8:start], "little")
    header = data[:header_end]
    if header not in _NPY_HEADERS:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)  # numpy's parser, once per distinct header
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in shards")
        _NPY_HEADERS[header] = (dtype, shape, fortran)
    dtype, shape, fortran = _NPY_HEADERS[header]
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=header_end)
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] RGB. libjpeg-turbo through simplejpeg (2x PIL's speed on
    112-px faces, identical pixels: docs/PERFORMANCE.md); PIL for what simplejpeg cannot read
    (CMYK, odd encodings) and to raise a clear error on bytes that are not an image.
    (torchvision.io's decoders are deprecated in 0.29.)"""
    if simplejpeg is not None:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def decode_sample(sample: dict, resolution: Optional[int] = None) -> dict:
    """Raw tar members of a v2 (KEY.hncl) or v1 (KEY.jpg, .heatmap.npy, .landmarks.npy, .json)
    sample -> tensors: image uint8 [3, H, W] (channels-last strides), heatmap uint8 [68, R, R],
    landmarks float32 [68, 2] (NaN when none), label (-1 when none), id. With `resolution`, a
    heatmap that is not [68, R, R] is a corrupt sample (it would break the batch)."""
    where = f"{sample.get('__key__')} in {sample.get('__url__')}"
    if V2_SUFFIX in sample:
        v2 = decode_v2(sample[V2_SUFFIX], resolution, where)
        try:
            meta = json.loads(v2.meta_json)
        except ValueError as e:
            raise CorruptSample("corrupt sample", f"unreadable metadata ({e}): {where}") from None
        jpeg, heatmap, lm = v2.jpeg, v2.heatmap, v2.landmarks
    else:
        for part in ("jpg", "heatmap.npy", "json"):
            if part not in sample:
                raise KeyError(f"{where} has no .{part}")
        meta = json.loads(sample["json"])
        jpeg = sample["jpg"]
        try:
            heatmap = read_npy(sample["heatmap.npy"])
        except ValueError as e:
            raise CorruptSample("corrupt heatmap", f"{e}: {where}") from None
        if heatmap.dtype != np.uint8 or heatmap.ndim != 3 or heatmap.shape[0] != 68 or \
                (resolution is not None and heatmap.shape[1:] != (resolution, resolution)):
            raise CorruptSample("corrupt heatmap", f"heatmap {heatmap.dtype} {list(heatmap.shape)}, expected uint8 "
                                                   f"[68, {resolution or 'R'}, {resolution or 'R'}]: {where}")
        lm = sample.get("landmarks.npy")
        lm = None if lm is None else read_npy(lm)
    image = torch.from_numpy(decode_jpeg(jpeg)).permute(2, 0, 1)  # a view: collation copies once
    landmarks = (torch.from_numpy(lm.astype(np.float32))
                 if lm is not None else torch.full((68, 2), float("nan")))
    heatmap = torch.from_numpy(heatmap)
    label = meta.get("label")
    return {"image": image, "heatmap": heatmap, "landmarks": landmarks,
            "label": -1 if label is None else int(label), "id": int(meta["id"])}


def _collate(counter: SkipCounter):
    def collate(samples: List[dict]) -> dict:  # each batch takes the losses counted since the last one
        out = {k: torch.stack([s[k] for s in samples]) for k in ("x1", "x2") if k in samples[0]}
        if "image" in samples[0]:
            out["image"] = torch.stack([s["image"] for s in samples])
        return {**out,
                "heatmap": torch.stack([s["heatmap"] for s in samples]),
                "landmarks": torch.stack([s["landmarks"] for s in samples]),
                "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
                "id": torch.tensor([s["id"] for s in samples], dtype=torch.int64),
                **({"epoch": torch.tensor([s["epoch"] for s in samples], dtype=torch.int64),
                    "stream": samples[-1]["stream"]}  # where the batch's reader is after it
                   if "epoch" in samples[0] else {}),
                "skipped": counter.take(), "skipped_where": counter.take_where()}
    return collate


@dataclass
class ShardSet:
    """A finished shard set: its manifest, shard URLs and descriptor."""

    root: str
    manifest: dict

    @classmethod
    def open(cls, root: str) -> "ShardSet":
        """Raises ShardFormatError (one line naming the format and the set) for a format this hncl
        does not read; v1 and v2 sets both open."""
        root = root.rstrip("/")
        url = storage.join(root, "manifest.json")
        if not storage.exists(url):
            if storage.is_remote(root) and not storage.bucket_exists(root):
                raise storage.MissingBucket(f"{root}: the S3 bucket '{root.split('/')[2]}' does not exist "
                                            f"(endpoint {os.environ.get('AWS_ENDPOINT_URL_S3') or 'AWS S3'})")
            raise InputError(f"{root} is not a finished shard set (no manifest.json); "
                                    f"build or resume it with `hncl make-shards ... --out {root}`")
        manifest = storage.read_json(url)
        check_format(manifest, root)
        return cls(root, manifest)

    @property
    def format(self) -> str:
        return check_format(self.manifest, self.root)

    @property
    def resolution(self) -> Optional[int]:
        """The stored heatmaps' R (every sample's heatmap must be [68, R, R])."""
        r = self.manifest.get("heatmap_resolution")
        return None if r is None else int(r)

    @property
    def urls(self) -> List[str]:
        return [storage.join(self.root, s["name"]) for s in self.manifest["shards"] if s["num_samples"] > 0]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def counts(self) -> List[int]:
        """Samples per shard, in the order of `urls`."""
        return [int(s["num_samples"]) for s in self.manifest["shards"] if s["num_samples"] > 0]

    @property
    def sample_counts(self) -> Dict[str, int]:
        """URL -> samples the manifest says the shard holds (what a failed shard loses)."""
        return {storage.join(self.root, s["name"]): int(s["num_samples"]) for s in self.manifest["shards"]
                if s["num_samples"] > 0}

    def descriptor(self) -> HeatmapDescriptor:
        return HeatmapDescriptor.load(io.BytesIO(storage.read_bytes(storage.join(self.root, "descriptor.npz"))))


class _ViewStage:
    """Replace each sample's image by `n` augmented views x1[, x2] (runs in the loader workers).
    With `seed`, a sample's views depend only on (seed, its data epoch, its id): the same after
    a resume, whichever reader makes them (the loader workers' own RNG seeds are drawn anew
    whenever a DataLoader starts)."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], n: int = 2, seed: Optional[int] = None):
        self.transform, self.n, self.seed = transform, n, seed

    def __call__(self, sample: dict) -> dict:
        image = sample.pop("image")
        with contextlib.ExitStack() as stack:
            if self.seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                key = [self.seed, sample.get("epoch", 0), sample["id"], sample["id"] >> 32]
                seed = np.random.SeedSequence([k % 2**32 for k in key]).generate_state(1, np.uint64)[0]
                torch.manual_seed(int(seed >> 1))
            for i in range(1, self.n + 1):
                sample[f"x{i}"] = self.transform(image)
        return sample


class _EpochStream(torch.utils.data.IterableDataset):
    """First stage of the training pipeline: this reader's samples of its data epoch as the
    `stream` state says (hncl/data/epoch_plan.py), from its position on, then of the next epoch,
    and so on. Samples carry their epoch (`__epoch__`) and where the reader is after them
    (`__stream__` = (reader, epoch, samples of the epoch's plan emitted)). The reader is (rank,
    loader worker), found when iteration starts (in the loader worker); the rank's workers take
    the readers' roles in the order the DataLoader will ask them for batches (from `turn` on)."""

    def __init__(self, shards: "ShardSet", samples: "ShardSamples", stream: StreamState, rank: int, world: int):
        self.urls, self.samples, self.stream, self.rank, self.world = shards.urls, samples, stream, rank, world

    def reader(self) -> tuple:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = self.world * workers
        if readers != self.stream.readers:
            raise ValueError(f"the stream state is for {self.stream.readers} readers, not {readers} "
                             f"({self.world} ranks x {workers} loader workers): resize it first")
        return self.rank * workers + (worker + self.stream.turn) % workers, readers

    def _span_samples(self, span: np.ndarray, indices: np.ndarray) -> Iterator[tuple]:
        """(index in span, raw sample) for span[indices] (ascending), reading each shard once."""
        offsets = np.concatenate([[0], np.cumsum(self.stream.counts)])
        positions = span[indices]
        shard_of = np.searchsorted(offsets, positions, side="right") - 1
        cut = np.flatnonzero(np.diff(shard_of)) + 1
        for run in np.split(np.arange(len(positions)), cut):
            if not len(run):
                continue
            shard = int(shard_of[run[0]])
            local = positions[run] - offsets[shard]
            at = dict(zip(local.tolist(), indices[run].tolist()))
            for sample in self.samples.read(self.urls[shard], local):
                yield at[sample["__index__"]], sample

    def _epoch(self, plan: EpochPlan, reader: int, start: int) -> Iterator[tuple]:
        """(samples of the plan emitted after this one, raw sample) from emission `start` on:
        each block of the span is read in order (what was emitted before `start` skipped), then
        emitted permuted; a sample the shard failed to deliver is passed over."""
        span = plan.span(reader)
        first_block = start - start % plan.block
        orders = {}
        todo = []
        for b in range(first_block, len(span), plan.block):
            size = min(plan.block, len(span) - b)
            orders[b] = plan.block_order(reader, b // plan.block, size) + b
            todo.append(orders[b][max(0, start - b):] if b == first_block else np.arange(b, b + size))
        if not todo:
            return
        reading = self._span_samples(span, np.sort(np.concatenate(todo)))
        ahead = next(reading, None)
        for b, order in orders.items():
            block = {}
            while ahead is not None and ahead[0] < b + len(order):
                block[ahead[0]] = ahead[1]
                ahead = next(reading, None)
            for i in range(max(0, start - b), len(order)):
                sample = block.pop(int(order[i]), None)
                if sample is not None:
                    yield b + i + 1, sample

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self.reader()
        epoch, start = self.stream.positions[reader]
        failed = 0
        while True:
            plan = self.stream.plan(epoch)
            planned = len(plan.span(reader)) - start
            n = 0
            for emitted, sample in self._epoch(plan, reader, start):
                n += 1
                sample["__epoch__"] = epoch
                sample["__stream__"] = (reader, epoch, emitted)
                yield sample
            # a share the deal left empty is fine; a share none of whose samples could be read is not
            failed = 0 if n or planned <= 0 else failed + 1
            if failed >= 3:  # three epochs running: never spin silently
                raise InputError(f"reader {reader} of {readers} could read none of its samples in 3 data epochs "
                                 f"({self.samples.last_failure or 'no sample delivered'}): the set is unreadable")
            epoch, start = epoch + 1, 0


def _decode_train(sample: dict, resolution: Optional[int]) -> dict:
    out = decode_sample(sample, resolution)
    out["epoch"], out["stream"] = sample["__epoch__"], sample["__stream__"]
    return out


def train_pipeline(shards: ShardSet, batch_size: int, seed: int = 0, shuffle_buffer: int = 2000,
                   counter: Optional[SkipCounter] = None,
                   view_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   views: int = 2, rank: int = 0, world: int = 1, stream: Optional[StreamState] = None,
                   loader_workers: int = 0, stall_timeout_s: float = 600.0) -> wds.DataPipeline:
    """Endless shuffled batches of this rank's share of every data epoch (see the module
    docstring), from `stream`'s position on (default: the start of epoch 0 for `world` ranks x
    `loader_workers` readers each); deterministic for (seed, world, loader workers). With
    `view_transform`, each sample carries `views` augmented views x1, x2 (made in the loader
    workers) instead of its image. Batches carry each sample's data epoch (`epoch`) and where
    their reader is after them (`stream`: reader, epoch, emitted)."""
    counter = counter or SkipCounter()
    if stream is None:
        stream = StreamState.start(shards.counts, seed, world * max(1, loader_workers), shuffle_buffer)
    stages = [
        _EpochStream(shards, ShardSamples(shards, counter, stall_timeout_s), stream, rank, world),
        wds.map(partial(_decode_train, resolution=shards.resolution), handler=counter.handler),
    ]
    if view_transform is not None:
        stages.append(wds.map(_ViewStage(view_transform, views, seed), handler=counter.handler))
    stages.append(wds.batched(batch_size, collation_fn=_collate(counter), partial=False))
    return wds.DataPipeline(*stages)


def eval_pipeline(shards: ShardSet, batch_size: int, counter: Optional[SkipCounter] = None,
                  stall_timeout_s: float = 600.0) -> wds.DataPipeline:
    """One pass, every sample exactly once over all ranks and loader workers."""
    counter = counter or SkipCounter()
    return wds.DataPipeline(
        wds.SimpleShardList(shards.urls),
        wds.split_by_node,
        wds.split_by_worker,
        ShardSamples(shards, counter, stall_timeout_s),
        wds.map(partial(decode_sample, resolution=shards.resolution), handler=counter.handler),
        wds.batched(batch_size, collation_fn=_collate(counter), partial=True),
    )


def loader(pipeline: wds.DataPipeline, num_workers: int = 2, timeout_s: float = 0) -> torch.utils.data.DataLoader:
    """DataLoader over a pipeline (batches are made by the pipeline). timeout_s > 0: a loader
    worker that delivers no batch for that long stops the run (a worker stuck below Python)."""
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                       timeout=timeout_s if num_workers > 0 else 0)


def add_skipped(total: Dict[str, int], batch: dict, where: Optional[Dict[str, List[str]]] = None) -> None:
    """Sum a batch's lost-sample counts into `total` (and their places into `where`)."""
    for reason, n in batch.get("skipped", {}).items():
        total[reason] = total.get(reason, 0) + n
    if where is not None:
        for reason, places in batch.get("skipped_where", {}).items():
            seen = where.setdefault(reason, [])
            seen.extend(p for p in places if p not in seen and len(seen) < SkipCounter.EXAMPLES)


def iterate_forever(dl) -> Iterator[dict]:
    while True:
        yield from dl
