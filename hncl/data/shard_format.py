"""The bytes of one sample in a shard: format versions, and the v2 sample container.

v1 (`hncl-shards/1`): four tar members per sample, KEY.jpg, KEY.heatmap.npy (uint8 [68, R, R]),
KEY.landmarks.npy (float16 [68, 2]) and KEY.json. Still read; still written with `--format 1`.

v2 (`hncl-shards/2`): one tar member per sample, KEY.hncl, holding the same JPEG bytes verbatim,
then one zlib stream with the metadata JSON, the landmarks and the heatmap stored sparsely (the
bounding box of each point's nonzero cells, then the cells inside it). Lossless: it decodes to
exactly v1's arrays and JSON. Why this layout (measured in docs/PERFORMANCE.md, "Shard bytes"):
every tar member costs a 512-byte header plus on average 256 bytes of padding, so at 112 px
(JPEG ~4.1 KB) even an image member plus a second member of nothing but a header would be
~1.4x the JPEG; one member per sample is what gets under 1.5x. The heatmap (17,408 bytes, ~600
nonzero cells) takes ~800 bytes as dense zlib, ~660 as boxes + zlib, and is the largest part of
what a sample adds to its JPEG. The byte-by-byte specification is shards/README.md.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hncl.errors import UserError

FORMAT_V1 = "hncl-shards/1"
FORMAT_V2 = "hncl-shards/2"
FORMATS = {1: FORMAT_V1, 2: FORMAT_V2}
SUPPORTED = (FORMAT_V1, FORMAT_V2)
DEFAULT_VERSION = 2

V2_SUFFIX = "hncl"  # the tar member of a v2 sample: KEY.hncl
MAGIC = b"HNCL"
CONTAINER_VERSION = 2
_HEADER = struct.Struct("<4sBBBBII")  # magic, container version, P, R, L, image bytes, metadata bytes
HEADER_SIZE = _HEADER.size  # 16
ZLIB_LEVEL = 9
NUM_POINTS = 68
F16 = np.dtype("<f2")


class ShardFormatError(UserError, ValueError):
    """A shard set in a format this hncl does not read."""


class CorruptSample(ValueError):
    """A sample whose bytes cannot be decoded; `reason` is what the skip counter counts it as."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def format_of(manifest: dict) -> str:
    """The manifest's format; sets written before v2 existed may have none: they are v1."""
    return manifest.get("format") or FORMAT_V1


def check_format(manifest: dict, where: str) -> str:
    fmt = format_of(manifest)
    if fmt not in SUPPORTED:
        raise ShardFormatError(f"{where}: shard format {fmt!r} is not supported by this hncl (reads "
                               f"{', '.join(SUPPORTED)}); upgrade hncl or rebuild the set")
    return fmt


def sample_member(fmt: str) -> str:
    """The member suffix every sample of a set in format `fmt` has exactly once."""
    return V2_SUFFIX if fmt == FORMAT_V2 else "json"


# --- the heatmap, sparse: per point the bounding box of its nonzero cells, then those cells -----
def _box_index(boxes: np.ndarray, resolution: int) -> np.ndarray:
    """Flat indices into [P, R, R] of every cell inside the boxes (y0, x0, h, w), point by
    point, row-major inside each box: the order the values are stored in."""
    b = boxes.astype(np.intp)
    w = b[:, 3]
    n = b[:, 2] * w
    corner = (np.arange(len(b)) * resolution + b[:, 0]) * resolution + b[:, 1]
    end = np.cumsum(n)
    k = np.arange(end[-1]) - np.repeat(end - n, n)  # position inside its box
    w_k = np.repeat(w, n)
    row = k // np.maximum(w_k, 1)
    # corner + row * R + column, with column = k - row * w
    return np.repeat(corner, n) + row * (resolution - w_k) + k


def pack_heatmap(heatmap: np.ndarray) -> bytes:
    """uint8 [P, R, R] -> boxes uint8 [P, 4] (y0, x0, h, w; all 0 for an all-zero point) + values."""
    if heatmap.dtype != np.uint8 or heatmap.ndim != 3 or heatmap.shape[1] != heatmap.shape[2]:
        raise ValueError(f"heatmap must be uint8 [P, R, R], got {heatmap.dtype} {list(heatmap.shape)}")
    r = heatmap.shape[1]
    nz = heatmap != 0
    rows, cols = nz.any(2), nz.any(1)
    has = rows.any(1)
    y0, x0 = rows.argmax(1), cols.argmax(1)
    h = r - rows[:, ::-1].argmax(1) - y0
    w = r - cols[:, ::-1].argmax(1) - x0
    boxes = np.where(has[:, None], np.column_stack([y0, x0, h, w]), 0).astype(np.uint8)
    values = heatmap.reshape(-1)[_box_index(boxes, r)]
    return boxes.tobytes() + values.tobytes()


def unpack_heatmap(data: memoryview, points: int, resolution: int) -> np.ndarray:
    """The inverse of pack_heatmap; `data` must be exactly its output."""
    if len(data) < 4 * points:
        raise ValueError(f"heatmap boxes need {4 * points} bytes, {len(data)} stored")
    boxes = np.frombuffer(data, np.uint8, 4 * points).reshape(points, 4)
    b = boxes.astype(np.int64)
    if ((b[:, 0] + b[:, 2]) > resolution).any() or ((b[:, 1] + b[:, 3]) > resolution).any() \
            or ((b[:, 2] == 0) != (b[:, 3] == 0)).any():
        raise ValueError(f"heatmap boxes malformed or outside the {resolution}x{resolution} grid")
    n = int((b[:, 2] * b[:, 3]).sum())
    if len(data) != 4 * points + n:
        raise ValueError(f"heatmap boxes hold {n} cells, {len(data) - 4 * points} bytes stored")
    out = np.zeros(points * resolution * resolution, np.uint8)
    out[_box_index(boxes, resolution)] = np.frombuffer(data, np.uint8, n, 4 * points)
    return out.reshape(points, resolution, resolution)


# --- the v2 sample container ---------------------------------------------------------------------
def encode_v2(jpeg: bytes, meta_json: bytes, landmarks: Optional[np.ndarray], heatmap: np.ndarray) -> bytes:
    """One v2 sample (the bytes of KEY.hncl). `meta_json` is stored as given (make_shards writes
    json.dumps(meta, sort_keys=True), as v1 does); landmarks float16 [L, 2] or None."""
    points, r = heatmap.shape[0], heatmap.shape[1]
    lm = b"" if landmarks is None else np.ascontiguousarray(landmarks, dtype=F16).tobytes()
    n_lm = 0 if landmarks is None else landmarks.shape[0]
    if landmarks is not None and landmarks.shape != (n_lm, 2):
        raise ValueError(f"landmarks must be [L, 2], got {list(landmarks.shape)}")
    if not (0 < points < 256 and 0 < r < 256 and n_lm < 256):
        raise ValueError(f"heatmap [{points}, {r}, {r}] / {n_lm} landmarks do not fit the v2 header")
    header = _HEADER.pack(MAGIC, CONTAINER_VERSION, points, r, n_lm, len(jpeg), len(meta_json))
    body = zlib.compress(meta_json + lm + pack_heatmap(heatmap), ZLIB_LEVEL)
    return header + jpeg + body


@dataclass
class SampleV2:
    jpeg: bytes
    meta_json: bytes
    landmarks: Optional[np.ndarray]  # float16 [L, 2]
    heatmap: np.ndarray  # uint8 [P, R, R]

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)


def decode_v2(data: bytes, resolution: Optional[int] = None, where: str = "") -> SampleV2:
    """The bytes of KEY.hncl -> its parts. Raises CorruptSample ("corrupt sample": the container
    or its compressed stream is damaged or truncated; "corrupt heatmap": the heatmap is not
    [68, R, R] with R = `resolution` when given, or its boxes do not add up)."""
    where = f" ({where})" if where else ""
    if len(data) < HEADER_SIZE:
        raise CorruptSample("corrupt sample", f"v2 sample of {len(data)} bytes, shorter than its header{where}")
    magic, version, points, r, n_lm, n_img, n_meta = _HEADER.unpack_from(data)
    if magic != MAGIC or version != CONTAINER_VERSION:
        raise CorruptSample("corrupt sample", f"not an hncl v2 sample (starts {bytes(data[:5])!r}){where}")
    if points != NUM_POINTS or r == 0 or (resolution is not None and r != resolution):
        raise CorruptSample("corrupt heatmap", f"heatmap [{points}, {r}, {r}], expected [{NUM_POINTS}, "
                                               f"{resolution or 'R'}, {resolution or 'R'}]{where}")
    end_img = HEADER_SIZE + n_img
    if end_img >= len(data):
        raise CorruptSample("corrupt sample", f"v2 sample cut short: {len(data)} bytes, its image alone "
                                              f"needs {end_img}{where}")
    z = zlib.decompressobj()
    try:
        body = z.decompress(data[end_img:])
    except zlib.error as e:
        raise CorruptSample("corrupt sample", f"damaged compressed data in a v2 sample: {e}{where}") from None
    if not z.eof or z.unused_data:
        what = "cut short" if not z.eof else "followed by extra bytes"
        raise CorruptSample("corrupt sample", f"v2 sample's compressed data is {what}{where}")
    n_head = n_meta + 4 * n_lm
    if len(body) < n_head:
        raise CorruptSample("corrupt sample", f"v2 sample holds {len(body)} bytes, its metadata and landmarks "
                                              f"need {n_head}{where}")
    view = memoryview(body)
    try:
        heatmap = unpack_heatmap(view[n_head:], points, r)
    except ValueError as e:
        raise CorruptSample("corrupt heatmap", f"{e}{where}") from None
    landmarks = np.frombuffer(body, F16, 2 * n_lm, n_meta).reshape(n_lm, 2) if n_lm else None
    return SampleV2(bytes(data[HEADER_SIZE:end_img]), body[:n_meta], landmarks, heatmap)
