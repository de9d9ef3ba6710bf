"""make_shards: a dataset source -> a WebDataset shard set with heatmaps (local folder or S3).

The set is planned as fixed row ranges (shard k = rows [k*S, (k+1)*S) of the source's
deterministic order), so any number of local processes or Ray tasks produce the same bytes.
Each shard is written to a temporary name and moved into place (renamed, or uploaded in one
PUT) only when complete; a sidecar `.shard-NNNNNN.tar.json` with its counts and sha256 is
written after it and marks it done. A rerun skips done shards, removes stale temporaries and
fills the gaps; `manifest.json` is written last, so a set with a manifest is complete.
Sets are written in format v2 (one tar member per sample) unless `format_version=1` is asked for.
"""

from __future__ import annotations

import io
import math
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from hncl import __version__

from hncl.config import SHARD_SET
from hncl.core.dist import torch_threads
from hncl.data.shard_format import DEFAULT_VERSION, FORMAT_V1, FORMATS, check_format, decode_v2, sample_member
from hncl.data.shard_writer import FaceProcessor, build_shard, shard_name
from hncl.data.sources import CLASSES, open_source
from hncl.errors import UserError, user_error_in
from hncl.heatmaps.descriptor import HeatmapDescriptor
from hncl.heatmaps.extractors import get_extractor
from hncl.infra import storage, tempfiles

DESCRIPTOR_SAMPLES = 4096


class MakeShardsError(UserError, RuntimeError):
    """make_shards could not finish; finished shards are kept and a rerun resumes."""


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to build any shard of the set (picklable, hashable)."""

    source: str
    out: str
    input: Optional[str] = None
    split: str = "train"
    source_options: tuple = ()  # sorted (key, value) pairs
    extractor: str = "landmarks"
    extractor_options: tuple = ()
    image_size: int = SHARD_SET.image_size
    resolution: int = SHARD_SET.resolution
    batch_size: int = 32
    format_version: int = DEFAULT_VERSION  # 2, or 1 for readers older than hncl-shards/2


@lru_cache(maxsize=4)
def _worker_state(job: ShardJob):
    """Source and extractor, built once per worker process."""
    source = open_source(job.source, job.input, job.split, **dict(job.source_options))
    extractor = get_extractor(job.extractor, **dict(job.extractor_options))
    return source, FaceProcessor(extractor, job.image_size, job.resolution)


def _sidecar(job: ShardJob, name: str) -> str:
    return storage.join(job.out, f".{name}.json")


def run_shard(job: ShardJob, index: int, start: int, stop: int) -> dict:
    """Build, move into place and mark done one shard. Runs in any worker."""
    tempfiles.sweep_orphans_once()
    source, processor = _worker_state(job)
    tmp_dir = None if storage.is_remote(job.out) else job.out  # same filesystem: the rename is atomic
    with torch_threads(1):
        path, stats = build_shard(source, processor, index, start, stop, job.source, job.batch_size, tmp_dir,
                                  job.format_version)
    storage.put_file(path, storage.join(job.out, stats.name))
    storage.write_json(_sidecar(job, stats.name), asdict(stats))
    return asdict(stats)


def plan(num_rows: int, shard_size: int) -> List[tuple]:
    return [(k, k * shard_size, min(num_rows, (k + 1) * shard_size)) for k in range(math.ceil(num_rows / shard_size))]


def _clean_stale(out: str) -> int:
    stale = [n for n in storage.listdir(out) if storage.TMP_MARK in n or n.endswith(".part")]
    for n in stale:
        storage.remove(storage.join(out, n))
    return len(stale)


def _finished(job: ShardJob, the_plan: List[tuple]) -> Dict[str, dict]:
    names = set(storage.listdir(job.out))
    done = {}
    for index, start, stop in the_plan:
        name = shard_name(index)
        if name in names and f".{name}.json" in names:
            stats = storage.read_json(_sidecar(job, name))
            if (stats["start"], stats["stop"]) != (start, stop):
                raise MakeShardsError(
                    f"{job.out} holds a different shard set ({name} covers rows {stats['start']}-{stats['stop']}, "
                    f"this run plans {start}-{stop}): the input or --shard-size changed. Use another --out, "
                    f"or delete it.")
            have = stats.get("format", FORMAT_V1)  # sidecars from before v2 carry no format
            if have != FORMATS[job.format_version]:
                raise MakeShardsError(
                    f"{job.out} holds {have} shards ({name}), this run writes {FORMATS[job.format_version]}: "
                    f"one set must not mix formats. Resume it with --format {have.rsplit('/', 1)[-1]}, use "
                    f"another --out, or delete it.")
            done[name] = stats
    return done


def _run_all(job, todo: List[tuple], workers: int, ray_address: Optional[str], progress: bool,
             task_fn=run_shard, gpus: int = 0) -> None:
    """task_fn(job, index, start, stop) for every (shard index, first row, end row) in todo: here,
    in local processes or as Ray tasks."""
    bar = tqdm(total=len(todo), desc=f"shards -> {job.out}", unit="shard", disable=not progress, file=sys.stderr)

    def failed(index: int, start: int, stop: int, err: BaseException) -> MakeShardsError:
        cause = user_error_in(err) or err  # a Ray task's error wraps the worker's
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return MakeShardsError(f"{shard_name(index)} (rows {start}-{stop}) failed: {type(cause).__name__}: {text}. "
                               f"Finished shards are kept; rerun the same command to resume.")

    try:
        if ray_address:
            import ray

            from hncl.infra.raycluster import connect_ray, require_visible, worker_env

            connect_ray(ray_address)  # 'auto': the cluster on this machine; 'local': a private instance
            require_visible([("--out", job.out, "output")])  # every node writes shards there
            # tasks start with their node's environment: this driver's S3 settings go with them;
            # SPREAD: over every node of the cluster, not first filling the driver's
            env = worker_env()
            task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2, scheduling_strategy="SPREAD",
                              **({"runtime_env": {"env_vars": env}} if env else {}))(task_fn)
            pending = {task.remote(job, *p): p for p in todo}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                p = pending.pop(ready[0])
                try:
                    ray.get(ready[0])
                except Exception as e:
                    raise failed(*p, e) from None
                bar.update(1)
        elif workers <= 1:
            for p in todo:
                try:
                    task_fn(job, *p)
                except (MakeShardsError, ValueError, FileNotFoundError):
                    raise
                except Exception as e:
                    raise failed(*p, e) from None
                bar.update(1)
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(task_fn, job, *p): p for p in todo}
                for fut in as_completed(futures):
                    try:
                        fut.result()
                    except Exception as e:
                        for other in futures:
                            other.cancel()
                        raise failed(*futures[fut], e) from None
                    bar.update(1)
    finally:
        bar.close()


def read_heatmaps(out: str, shard_names: List[str], limit: int) -> torch.Tensor:
    """Up to `limit` stored heatmaps, spread evenly over the shards (deterministic; the same
    heatmaps from a v1 and a v2 set of the same rows)."""
    per = max(1, math.ceil(limit / max(1, len(shard_names))))
    arrays = []
    for name in shard_names:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(out, name)))) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith((".heatmap.npy", ".hncl"))]
            step = max(1, len(members) // per)
            for m in members[::step][:per]:
                data = tar.extractfile(m).read()
                arrays.append(decode_v2(data, where=f"{name}/{m.name}").heatmap if m.name.endswith(".hncl")
                              else np.load(io.BytesIO(data), allow_pickle=False))
    return torch.from_numpy(np.stack(arrays[:limit])) if arrays else torch.empty(0)


def make_shards(job: ShardJob, shard_size: int = SHARD_SET.shard_size, workers: int = 1,
                ray_address: Optional[str] = None, max_skip_fraction: float = SHARD_SET.max_skip_fraction,
                descriptor_dim: int = SHARD_SET.descriptor_dim, inner_only: bool = SHARD_SET.inner_only,
                seed: int = 0, readers: Optional[int] = None, command: str = "", progress: bool = True,
                log=print) -> dict:
    """Build (or resume) the shard set `job.out`; returns the manifest."""
    for flag, ok, rule, value in (  # every option's range, before anything is written
            ("--shard-size", shard_size >= 1, ">= 1", shard_size),
            ("--workers", workers >= 1, ">= 1", workers),
            ("--descriptor-dim", descriptor_dim >= 1, ">= 1", descriptor_dim),
            ("--max-skip-fraction", 0 <= max_skip_fraction <= 1, "in [0, 1]", max_skip_fraction),
            ("--seed", seed >= 0, ">= 0", seed),
            ("--readers", readers is None or readers >= 1, ">= 1", readers),
            ("--num-samples", dict(job.source_options).get("num_samples", 1) >= 1, ">= 1",
             dict(job.source_options).get("num_samples"))):
        if not ok:
            raise ValueError(f"{flag} must be {rule}, got {value}")
    if job.format_version not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {job.format_version}")
    t0 = time.time()
    source = open_source(job.source, job.input, job.split, **dict(job.source_options))
    if len(source) == 0:
        raise MakeShardsError(f"source {job.source} ({job.input or ''}, split {job.split}) has no rows")
    the_plan = plan(len(source), shard_size)
    storage.makedirs(job.out)
    removed = _clean_stale(job.out)
    done = _finished(job, the_plan)
    todo = [p for p in the_plan if shard_name(p[0]) not in done]
    log(f"{job.source}: {len(source)} rows -> {len(the_plan)} shards in {job.out} "
        f"({len(done)} already done{f', {removed} stale temporary files removed' if removed else ''})")
    if todo:
        gpus = 1 if job.extractor == "fan" and dict(job.extractor_options).get("device", "cpu") != "cpu" else 0
        _run_all(job, todo, workers, ray_address, progress, gpus=gpus)
    stats = [storage.read_json(_sidecar(job, shard_name(p[0]))) for p in the_plan]

    total = sum(s["num_samples"] for s in stats)
    skipped: Dict[str, int] = {}
    for s in stats:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    n_skipped = sum(skipped.values())
    noted: Dict[str, int] = {}
    for s in stats:
        for what, n in s.get("noted", {}).items():
            noted[what] = noted.get(what, 0) + n
    if noted:  # kept, but the user should know (e.g. which face of a group photo was used)
        log("kept with a note: " + ", ".join(f"{w}: {n}" for w, n in sorted(noted.items())))
        for e in [e for s in stats for e in s.get("noted_examples", [])][:5]:
            log(f"  e.g. {e}")
    if n_skipped:
        examples = [e for s in stats for e in s["skipped_examples"]][:5]
        log(f"skipped {n_skipped} of {len(source)} rows: " + ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items())))
        for e in examples:
            log(f"  e.g. {e}")
    if n_skipped > max_skip_fraction * len(source) or total == 0:
        raise MakeShardsError(
            f"{n_skipped} of {len(source)} rows skipped ({n_skipped / len(source):.1%}), above --max-skip-fraction "
            f"{max_skip_fraction:.1%} ({', '.join(f'{r}: {n}' for r, n in sorted(skipped.items()))}). The shards are "
            f"kept but no manifest was written; fix the input or raise the threshold and rerun.")
    ids = [i for s in stats for i in s["ids"]]
    if len(ids) != len(set(ids)):
        raise MakeShardsError(f"{len(ids) - len(set(ids))} duplicate sample ids in {job.out}: two source rows map "
                              f"to the same id")

    names = [s["name"] for s in stats if s["num_samples"] > 0]
    heatmaps = read_heatmaps(job.out, names, DESCRIPTOR_SAMPLES)
    n_features = (51 if inner_only else 68) * job.resolution ** 2
    dim = min(descriptor_dim, heatmaps.shape[0], n_features)
    if dim < descriptor_dim:
        log(f"warning: descriptor dim capped at {dim} (the set has {heatmaps.shape[0]} heatmaps)")
    descriptor = HeatmapDescriptor.fit(heatmaps, dim=dim, inner_only=inner_only, seed=seed)
    storage.write_bytes(storage.join(job.out, "descriptor.npz"), descriptor.to_bytes())

    class_counts: Dict[str, int] = {c: 0 for c in CLASSES}
    for s in stats:
        for c, n in s["class_counts"].items():
            class_counts[c] += n
    extractor = _worker_state(job)[1].extractor
    manifest = {
        "format": FORMATS[job.format_version], "hncl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_samples": total, "num_shards": len(stats),
        "shards": [{"name": s["name"], "num_samples": s["num_samples"], "sha256": s["sha256"],
                    "rows": [s["start"], s["stop"]]} for s in stats],
        "splits": {job.split: total}, "classes": list(CLASSES),
        "class_counts": {c: n for c, n in class_counts.items() if n or c != "contempt"},
        "labelled": sum(class_counts.values()), "skipped": skipped, "noted": noted, "excluded": dict(source.excluded),
        "source": {"name": job.source, "input": job.input, "split": job.split, **dict(job.source_options)},
        "extractor": {"name": job.extractor, "version": extractor.version},
        "image_size": job.image_size, "heatmap_resolution": job.resolution,
        "descriptor": descriptor.spec(), "seed": seed, "shard_size": shard_size, "command": command,
    }
    storage.write_json(storage.join(job.out, "manifest.json"), manifest)
    readers = readers or 8
    if len(stats) < readers:
        log(f"warning: {len(stats)} shards for {readers} expected readers (ranks x loader workers): some readers "
            f"will get no shard in evaluation mode; use a smaller --shard-size")
    log(f"done: {total} samples in {len(stats)} shards at {job.out} ({time.time() - t0:.1f}s); "
        f"classes: {', '.join(f'{c} {n}' for c, n in class_counts.items() if n)}")
    return manifest


def verify(out: str) -> dict:
    """Check a finished set against its manifest (v1 or v2): every shard present with its sha256
    and sample count, no duplicate or missing ids, no temporary files. Returns the manifest."""
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    import hashlib

    suffix = "." + sample_member(check_format(manifest, out))  # one such member per sample

    seen = set()
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(out, entry["name"]))
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise MakeShardsError(f"{entry['name']}: sha256 does not match the manifest")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys = [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(suffix)]
        if len(keys) != entry["num_samples"]:
            raise MakeShardsError(f"{entry['name']}: {len(keys)} samples, manifest says {entry['num_samples']}")
        dup = seen.intersection(keys)
        if dup:
            raise MakeShardsError(f"{entry['name']}: duplicate samples {sorted(dup)[:3]}")
        seen.update(keys)
    if len(seen) != manifest["num_samples"]:
        raise MakeShardsError(f"{len(seen)} samples found, manifest says {manifest['num_samples']}")
    stale = [n for n in storage.listdir(out) if storage.TMP_MARK in n or n.endswith(".part")]
    if stale:
        raise MakeShardsError(f"temporary files left in {out}: {stale[:3]}")
    return manifest
