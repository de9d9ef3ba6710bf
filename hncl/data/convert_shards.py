"""convert_shards: a v1 shard set -> the same set in format v2, from its stored members.

No image is decoded and no landmark extractor runs: each v1 sample's JPEG bytes, heatmap,
landmarks and JSON are repacked into one v2 member (hncl/data/shard_format.py) and checked to
decode back to exactly what v1 stored. Sample keys, their order, shard names and row ranges are
kept, so a converted set streams the same samples in the same order for a seed, and its shards
are byte-identical to the ones `make_shards` writes in v2 from the same input. descriptor.npz
is copied as is (it was fitted on these very heatmaps).

Local folders and s3:// alike, like make_shards: each shard appears under its final name only
when complete, a sidecar marks it done, a rerun keeps finished shards and fills the gaps, and
manifest.json (the v1 manifest, format "hncl-shards/2", new sha256s, `converted_from`) is
written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from hncl import __version__

from hncl.data.make_shards import MakeShardsError, _clean_stale, _run_all
from hncl.data.shard_format import FORMAT_V1, FORMAT_V2, check_format, decode_v2, encode_v2
from hncl.data.shard_writer import add_member, open_tar
from hncl.data.shards import read_npy
from hncl.data.sources import CLASSES
from hncl.infra import storage, tempfiles

V1_PARTS = ("jpg", "heatmap.npy", "landmarks.npy", "json")


@dataclass(frozen=True)
class ConvertJob:
    src: str
    out: str


def _source_manifest(src: str) -> dict:
    return storage.read_json(storage.join(src, "manifest.json"))


def _sidecar(root: str, name: str) -> str:
    return storage.join(root, f".{name}.json")


def _v1_samples(tar: tarfile.TarFile, where: str):
    """(key, {part: bytes}) per sample, in the tar's order; every member accounted for."""
    key, parts = None, {}
    for m in tar:
        if not m.isfile():
            continue
        base, _, ext = os.path.basename(m.name).partition(".")
        if ext not in V1_PARTS:
            raise MakeShardsError(f"{where}: unexpected member {m.name} (a v1 sample has {', '.join(V1_PARTS)}); "
                                  f"converting would lose it")
        if base != key:
            if key is not None:
                yield key, parts
            key, parts = base, {}
        if ext in parts:
            raise MakeShardsError(f"{where}: {m.name} appears twice in one sample")
        parts[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, parts


def _v2_member(key: str, parts: Dict[str, bytes], where: str) -> bytes:
    missing = [p for p in ("jpg", "heatmap.npy", "json") if p not in parts]
    if missing:
        raise MakeShardsError(f"{where}: sample {key} has no .{', .'.join(missing)}")
    heatmap = read_npy(parts["heatmap.npy"])
    landmarks = read_npy(parts["landmarks.npy"]) if "landmarks.npy" in parts else None
    if heatmap.dtype != np.uint8 or heatmap.ndim != 3 or heatmap.shape[1] != heatmap.shape[2]:
        raise MakeShardsError(f"{where}: sample {key} has a {heatmap.dtype} {list(heatmap.shape)} heatmap, "
                              f"not uint8 [68, R, R]")
    if landmarks is not None and (landmarks.dtype != np.float16 or landmarks.ndim != 2 or landmarks.shape[1] != 2):
        raise MakeShardsError(f"{where}: sample {key} has {landmarks.dtype} {list(landmarks.shape)} landmarks, "
                              f"not float16 [L, 2]")
    data = encode_v2(parts["jpg"], parts["json"], landmarks, heatmap)
    back = decode_v2(data)  # lossless, or nothing is written
    if not (back.jpeg == parts["jpg"] and back.meta_json == parts["json"] and np.array_equal(back.heatmap, heatmap)
            and (landmarks is None) == (back.landmarks is None)
            and (landmarks is None or landmarks.tobytes() == back.landmarks.tobytes())):
        raise MakeShardsError(f"{where}: sample {key} does not survive the v2 encoding (a bug in hncl)")
    return data


def convert_shard(job: ConvertJob, index: int, start: int, stop: int) -> dict:
    """Convert shard `index` of job.src and mark it done in job.out. Runs in any worker."""
    tempfiles.sweep_orphans_once()
    entry = _source_manifest(job.src)["shards"][index]
    name = entry["name"]
    where = storage.join(job.src, name)
    data = storage.read_bytes(where)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise MakeShardsError(f"{where}: sha256 does not match the set's manifest: the shard is damaged or was "
                              f"replaced; restore it or rebuild the set with hncl make-shards")
    source_sidecar = _sidecar(job.src, name)
    stats = storage.read_json(source_sidecar) if storage.exists(source_sidecar) else {}
    ids, class_counts = [], {}
    fd, path = (tempfiles.mkstemp("shard", suffix=".part") if storage.is_remote(job.out)  # swept if killed
                else tempfile.mkstemp(prefix=f"{name}.", suffix=".part", dir=job.out))
    try:
        with os.fdopen(fd, "wb") as raw, open_tar(raw) as out:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for key, parts in _v1_samples(tar, where):
                    add_member(out, f"{key}.hncl", _v2_member(key, parts, where))
                    meta = json.loads(parts["json"])
                    ids.append(int(meta["id"]))
                    if meta.get("label") is not None:
                        c = CLASSES[int(meta["label"])]
                        class_counts[c] = class_counts.get(c, 0) + 1
        if len(ids) != entry["num_samples"]:
            raise MakeShardsError(f"{where}: {len(ids)} samples, the manifest says {entry['num_samples']}")
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        storage.put_file(path, storage.join(job.out, name))
    finally:
        if os.path.exists(path):
            os.remove(path)
    stats.update(name=name, start=start, stop=stop, num_samples=len(ids), sha256=sha.hexdigest(), format=FORMAT_V2,
                 source_sha256=entry["sha256"], ids=ids, class_counts=class_counts)
    stats.setdefault("skipped", {})
    stats.setdefault("skipped_examples", [])
    storage.write_json(_sidecar(job.out, name), stats)
    return stats


def _plan(manifest: dict) -> List[tuple]:
    plan = []
    for i, s in enumerate(manifest["shards"]):
        start, stop = s.get("rows", [0, s["num_samples"]])
        plan.append((i, start, stop))
    return plan


def convert_shards(src: str, out: str, workers: int = 1, ray_address: Optional[str] = None, command: str = "",
                   progress: bool = True, log=print) -> dict:
    """Convert the finished v1 set `src` to v2 at `out` (or resume doing so); returns the new manifest."""
    src, out = src.rstrip("/"), out.rstrip("/")
    t0 = time.time()
    same = src == out if storage.is_remote(src) else os.path.abspath(src) == os.path.abspath(out)
    if same:
        raise MakeShardsError(f"--out must differ from the set being converted ({src}): shards are rewritten")
    if not storage.exists(storage.join(src, "manifest.json")):
        raise FileNotFoundError(f"{src} is not a finished shard set (no manifest.json)")
    manifest = _source_manifest(src)
    fmt = check_format(manifest, src)
    if fmt != FORMAT_V1:
        raise MakeShardsError(f"{src} is already {fmt}: nothing to convert")
    job = ConvertJob(src, out)
    storage.makedirs(out)
    removed = _clean_stale(out)
    the_plan = _plan(manifest)
    names = set(storage.listdir(out))
    done = set()
    for index, _, _ in the_plan:
        entry = manifest["shards"][index]
        if entry["name"] in names and f".{entry['name']}.json" in names:
            stats = storage.read_json(_sidecar(out, entry["name"]))
            if stats.get("source_sha256") != entry["sha256"]:
                raise MakeShardsError(f"{out} holds a {entry['name']} that is not a conversion of {src}'s; use "
                                      f"another --out, or delete it")
            done.add(index)
    todo = [p for p in the_plan if p[0] not in done]
    log(f"{src}: {manifest['num_samples']} samples in {len(the_plan)} {FORMAT_V1} shards -> {FORMAT_V2} in {out} "
        f"({len(done)} already done{f', {removed} stale temporary files removed' if removed else ''})")
    if todo:
        _run_all(job, todo, workers, ray_address, progress, task_fn=convert_shard)
    stats = [storage.read_json(_sidecar(out, manifest["shards"][i]["name"])) for i, _, _ in the_plan]
    storage.write_bytes(storage.join(out, "descriptor.npz"), storage.read_bytes(storage.join(src, "descriptor.npz")))
    new = {**manifest, "format": FORMAT_V2, "hncl_version": __version__,
           "shards": [{**e, "sha256": s["sha256"]} for e, s in zip(manifest["shards"], stats)],
           "converted_from": {"set": src, "format": fmt, "created": manifest.get("created"),
                              "hncl_version": manifest.get("hncl_version"),
                              "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command}}
    storage.write_json(storage.join(out, "manifest.json"), new)
    src_bytes = sum(storage.size(storage.join(src, e["name"])) for e in manifest["shards"])
    out_bytes = sum(storage.size(storage.join(out, e["name"])) for e in new["shards"])
    log(f"done: {new['num_samples']} samples in {len(stats)} shards at {out} ({time.time() - t0:.1f}s); "
        f"{src_bytes / max(1, new['num_samples']):,.0f} -> {out_bytes / max(1, new['num_samples']):,.0f} bytes "
        f"per sample")
    return new
