"""Build one shard: source rows [start, stop) -> aligned faces + heatmaps -> one tar.

Per row: crop (the source's face box, squared, or the whole image padded to a square) ->
work image (256 px) -> landmarks (given, or from the extractor) -> similarity alignment on eyes
and nose -> aligned face (JPEG) + pooled uint8 heatmaps of the aligned face + landmarks, written
as one v2 member per sample (KEY.hncl, hncl/data/shard_format.py) or v1's four. Rows that fail
are skipped with a reason; nothing here is random, so a shard's bytes depend only on its rows,
whichever worker builds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from hncl.data.shard_format import DEFAULT_VERSION, FORMATS, V2_SUFFIX, encode_v2
from hncl.data.sources import CLASSES, Source, SourceError, SourceItem
from hncl.heatmaps.align import apply_affine, similarity_to_template, warp
from hncl.heatmaps.extractors import HeatmapExtractor
from hncl.heatmaps.render import HEATMAP_SIZE, pool_heatmaps, render_heatmaps
from hncl.infra import tempfiles

WORK_SIZE = 256
JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed metadata: identical input gives byte-identical tars


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(dataset: str, sample_id: int) -> str:
    # webdataset splits keys at the first dot: no dots here
    return f"{dataset}-{sample_id:019d}"


@dataclass
class ShardStats:
    name: str
    start: int
    stop: int
    num_samples: int = 0
    sha256: str = ""
    class_counts: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    skipped_examples: List[str] = field(default_factory=list)
    ids: List[int] = field(default_factory=list)
    noted: Dict[str, int] = field(default_factory=dict)  # kept, but counted (e.g. several faces)
    noted_examples: List[str] = field(default_factory=list)
    format: str = FORMATS[DEFAULT_VERSION]

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f"{reason}: {where}")

    def note(self, what: str, where: str) -> None:
        self.noted[what] = self.noted.get(what, 0) + 1
        if len(self.noted_examples) < 5:
            self.noted_examples.append(f"{what}: {where}")


def square_crop(item: SourceItem) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The face as a WORK_SIZE square (box enlarged by 25% for context, or the whole image),
    padded with edge pixels where it leaves the image; landmarks moved along."""
    h, w = item.image.shape[:2]
    if item.box is not None:
        x, y, bw, bh = item.box
        side = 1.25 * max(bw, bh)
        cx, cy = x + bw / 2, y + bh / 2
    else:
        side, cx, cy = float(max(h, w)), w / 2, h / 2
    scale = WORK_SIZE / side
    m = torch.tensor([[[scale, 0.0, WORK_SIZE / 2 - cx * scale], [0.0, scale, WORK_SIZE / 2 - cy * scale]]],
                     dtype=torch.float64)
    img = torch.from_numpy(np.ascontiguousarray(item.image)).permute(2, 0, 1).unsqueeze(0).float()
    work = warp(img, m, WORK_SIZE).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    pts = None if item.landmarks is None else apply_affine(item.landmarks, m[0].numpy()).astype(np.float32)
    return work, pts


@dataclass
class ProcessedFace:
    """One image through FaceProcessor: the aligned face, or why there is none (`reason`), and
    what is worth counting about a face that was kept (`note`, e.g. several faces found)."""

    aligned: Optional[np.ndarray] = None  # uint8 [S, S, 3]
    landmarks: Optional[np.ndarray] = None  # float32 [68, 2] in the aligned face
    heatmap: Optional[np.ndarray] = None  # uint8 [68, R, R]
    reason: Optional[str] = None
    note: Optional[str] = None


class FaceProcessor:
    """Aligns faces and makes their heatmaps with one extractor, in batches."""

    def __init__(self, extractor: HeatmapExtractor, image_size: int = 112, resolution: int = 16):
        self.extractor, self.image_size, self.resolution = extractor, image_size, resolution

    def process(self, items: List[SourceItem]) -> List[ProcessedFace]:
        """One ProcessedFace per item, in order."""
        crops = [square_crop(it) for it in items]
        works = np.stack([c[0] for c in crops])
        if self.extractor.name == "landmarks":
            if any(c[1] is None for c in crops):
                raise ValueError("the 'landmarks' extractor needs a source with landmarks (synthetic, affectnet); "
                                 "use --extractor dlib or fan")
            pts = np.stack([c[1] for c in crops])
            ext = self.extractor.extract(works, pts)
        else:
            ext = self.extractor.extract(works)
        out = []
        s = self.image_size
        for i in range(len(items)):
            if not ext.ok[i]:
                out.append(ProcessedFace(reason=ext.reasons[i] or "extractor failed"))
                continue
            p = ext.landmarks[i].numpy().astype(np.float64)
            if not np.isfinite(p).all():
                out.append(ProcessedFace(reason="no landmarks"))
                continue
            m = similarity_to_template(p, s)
            scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
            if not 0.05 < scale * WORK_SIZE / s < 20:  # the face would be absurdly small or large
                out.append(ProcessedFace(reason="implausible landmarks"))
                continue
            mt = torch.from_numpy(m).unsqueeze(0)
            img = torch.from_numpy(works[i]).permute(2, 0, 1).unsqueeze(0).float()
            aligned = warp(img, mt, s).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
            apts = apply_affine(p, m).astype(np.float32)
            if self.extractor.name == "fan":  # keep the network's own heatmaps, warped with the face
                hm = warp(ext.heatmaps[i:i + 1], mt, HEATMAP_SIZE, src_scale=WORK_SIZE / HEATMAP_SIZE,
                          dst_scale=s / HEATMAP_SIZE)
            else:
                hm = render_heatmaps(torch.from_numpy(apts).unsqueeze(0), s)
            out.append(ProcessedFace(aligned, apts, pool_heatmaps(hm, self.resolution)[0].numpy(),
                                     note=ext.note(i)))
        return out


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata (same bytes -> same tar)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), TAR_MTIME, 0o444, "hncl", "hncl"
    tar.addfile(info, io.BytesIO(data))


def open_tar(raw) -> tarfile.TarFile:
    return tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT)


def write_sample(tar: tarfile.TarFile, version: int, key: str, jpeg: bytes, meta_json: bytes,
                 landmarks: Optional[np.ndarray], heatmap: np.ndarray) -> None:
    """One sample in the layout of format `version` (shards/README.md)."""
    if version == 2:
        add_member(tar, f"{key}.{V2_SUFFIX}", encode_v2(jpeg, meta_json, landmarks, heatmap))
        return
    add_member(tar, f"{key}.jpg", jpeg)
    add_member(tar, f"{key}.heatmap.npy", _npy_bytes(heatmap))
    if landmarks is not None:
        add_member(tar, f"{key}.landmarks.npy", _npy_bytes(landmarks))
    add_member(tar, f"{key}.json", meta_json)


def build_shard(source: Source, processor: FaceProcessor, index: int, start: int, stop: int, dataset: str,
                batch_size: int = 32, tmp_dir: Optional[str] = None,
                version: int = DEFAULT_VERSION) -> Tuple[str, ShardStats]:
    """Write rows [start, stop) to a local temporary tar in format `version`. Returns (temp path, stats)."""
    stats = ShardStats(shard_name(index), start, stop, format=FORMATS[version])
    fd, path = (tempfiles.mkstemp("shard", suffix=".part") if tmp_dir is None  # for upload: swept if killed
                else tempfile.mkstemp(prefix=f"{shard_name(index)}.", suffix=".part", dir=tmp_dir))
    sha = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as raw:
            with open_tar(raw) as tar:
                for b0 in range(start, stop, batch_size):
                    items = []
                    for i in range(b0, min(stop, b0 + batch_size)):
                        try:
                            items.append(source.item(i))
                        except SourceError as e:
                            stats.skip(e.reason, e.where)
                    if not items:
                        continue
                    for item, face in zip(items, processor.process(items)):
                        where = str(item.meta.get("source", item.sample_id))
                        if face.reason is not None:
                            stats.skip(face.reason, where)
                            continue
                        if face.note is not None:
                            stats.note(face.note, where)
                        aligned, pts, pooled = face.aligned, face.landmarks, face.heatmap
                        key = sample_key(dataset, item.sample_id)
                        jpg = io.BytesIO()
                        Image.fromarray(aligned).save(jpg, format="JPEG", quality=JPEG_QUALITY)
                        meta = {"id": item.sample_id, "label": item.label,
                                "label_name": None if item.label is None else CLASSES[item.label],
                                "dataset": dataset, "extractor": processor.extractor.version, **item.meta}
                        write_sample(tar, version, key, jpg.getvalue(), json.dumps(meta, sort_keys=True).encode(),
                                     pts.astype(np.float16), pooled)
                        stats.num_samples += 1
                        stats.ids.append(item.sample_id)
                        if item.label is not None:
                            name = CLASSES[item.label]
                            stats.class_counts[name] = stats.class_counts.get(name, 0) + 1
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
    except BaseException:  # a failed shard leaves no temporary file behind
        os.remove(path)
        raise
    stats.sha256 = sha.hexdigest()
    return path, stats
