"""Shard bytes: what one sample costs in format v1 and v2 against its JPEG alone, and the heatmap
encodings compared for v2 (issue #16).

    python benchmarks/shard_bytes.py [--faces 1400 --shard-size 350 --rounds 5]

For 112 and 224 px faces: a synthetic set in v1 (make_shards --format 1, the demo's shard
size), converted to v2 with convert_shards (timed); bytes per sample counted from the tar
members (512-byte header + data padded to 512 per member) and, separately, the shard files'
own size per sample (adds each shard's end-of-archive blocks). Also what a two-member v2
(KEY.jpg + everything else in one member) would cost, and one real photo (scikit-image's
astronaut, aligned by dlib like make_shards does) for the JPEG size of a textured face.
Heatmap encodings, on the set's uint8 [68, 16, 16] heatmaps: mean bytes, decode microseconds
per sample (one thread, median of rounds) and whether the decoded array equals the original.
S3 traffic per GPU: bytes per sample x samples/s at an assumed GPU throughput (--gpu-rate).

Writes benchmarks/results/shard_bytes.json.
"""

from __future__ import annotations

import argparse
import bz2
import io
import lzma
import os
import sys
import tarfile
import tempfile
import time
import zlib
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median, table, write  # noqa: E402

from hncl.data.convert_shards import convert_shards  # noqa: E402
from hncl.data.make_shards import ShardJob, make_shards  # noqa: E402
from hncl.data.shard_format import decode_v2, encode_v2, pack_heatmap, unpack_heatmap  # noqa: E402
from hncl.data.shards import ShardSet, read_npy  # noqa: E402
from hncl.infra import storage  # noqa: E402

BLOCK = 512


def member_bytes(size: int) -> int:
    """What one tar member of `size` bytes occupies: its header plus the data padded to 512."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def set_members(root: str) -> Dict[str, Dict[str, bytes]]:
    """key -> {suffix: bytes}, over the whole set."""
    out: Dict[str, Dict[str, bytes]] = {}
    for url in ShardSet.open(root).urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def per_sample(root: str, samples: Dict[str, Dict[str, bytes]]) -> Dict[str, float]:
    n = len(samples)
    members = sum(member_bytes(len(b)) for s in samples.values() for b in s.values())
    files = sum(storage.size(u) for u in ShardSet.open(root).urls)
    return {"members": members / n, "files": files / n, "members_per_sample": sum(map(len, samples.values())) / n}


def two_member_v2(v2: Dict[str, Dict[str, bytes]]) -> float:
    """Per sample: KEY.jpg + one member with the rest (the v2 container with an empty image)."""
    total = 0
    for s in v2.values():
        d = decode_v2(s["hncl"])
        rest = encode_v2(b"", d.meta_json, d.landmarks, d.heatmap)
        total += member_bytes(len(d.jpeg)) + member_bytes(len(rest))
    return total / len(v2)


# --- heatmap encodings -----------------------------------------------------------------------------
def _png(h: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(h.reshape(h.shape[0], -1)).save(buf, format="PNG", optimize=True)  # one row per point
    return buf.getvalue()


def _npz(h: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, heatmap=h)
    return buf.getvalue()


def _npy(h: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, h)
    return buf.getvalue()


LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9}]
TOPK = 9


def _peaks(h: np.ndarray) -> bytes:
    """Lossy: per point the 9 largest cells (flat index) with 4-bit values."""
    flat = h.reshape(h.shape[0], -1)
    idx = np.argsort(-flat.astype(np.int16), axis=1, kind="stable")[:, :TOPK]
    vals = np.take_along_axis(flat, idx, 1) >> 4
    return zlib.compress(idx.astype(np.uint8).tobytes() + vals.astype(np.uint8).tobytes(), 9)


def _unpeaks(b: bytes, p: int = 68, r: int = 16) -> np.ndarray:
    d = np.frombuffer(zlib.decompress(b), np.uint8)
    idx, vals = d[: p * TOPK].reshape(p, TOPK), d[p * TOPK:].reshape(p, TOPK)
    out = np.zeros((p, r * r), np.uint8)
    values = np.where(vals > 0, (vals.astype(np.uint16) << 4) + 8, 0).astype(np.uint8)
    np.put_along_axis(out, idx.astype(np.intp), values, 1)
    return out.reshape(p, r, r)


def encodings(shape) -> Dict[str, tuple]:
    p, r, _ = shape
    dense = lambda b: np.frombuffer(b, np.uint8).reshape(shape)  # noqa: E731
    return {  # name -> (encode, decode, lossless by design)
        ".npy, raw (v1; hncl read_npy)": (_npy, read_npy, True),
        "zlib level 1, dense": (lambda h: zlib.compress(h.tobytes(), 1), lambda b: dense(zlib.decompress(b)), True),
        "zlib level 6, dense": (lambda h: zlib.compress(h.tobytes(), 6), lambda b: dense(zlib.decompress(b)), True),
        "zlib level 9, dense": (lambda h: zlib.compress(h.tobytes(), 9), lambda b: dense(zlib.decompress(b)), True),
        "lzma (raw LZMA2, preset 9), dense": (
            lambda h: lzma.compress(h.tobytes(), format=lzma.FORMAT_RAW, filters=LZMA2),
            lambda b: dense(lzma.decompress(b, format=lzma.FORMAT_RAW, filters=LZMA2)), True),
        "bz2 level 9, dense": (lambda h: bz2.compress(h.tobytes(), 9), lambda b: dense(bz2.decompress(b)), True),
        "npz (np.savez_compressed)": (_npz, lambda b: np.load(io.BytesIO(b))["heatmap"], True),
        "PNG 68 x 256 (PIL, optimize)": (_png, lambda b: np.asarray(Image.open(io.BytesIO(b))).reshape(shape), True),
        "sparse boxes + zlib 9 (v2)": (lambda h: zlib.compress(pack_heatmap(h), 9),
                                       lambda b: unpack_heatmap(memoryview(zlib.decompress(b)), p, r), True),
        "sparse boxes + lzma": (lambda h: lzma.compress(pack_heatmap(h), format=lzma.FORMAT_RAW, filters=LZMA2),
                                lambda b: unpack_heatmap(memoryview(lzma.decompress(b, format=lzma.FORMAT_RAW,
                                                                                    filters=LZMA2)), p, r), True),
        f"lossy: {TOPK} largest cells per point, 4-bit": (_peaks, lambda b: _unpeaks(b, p, r), False),
    }


def time_decode(fn: Callable, items: List[bytes], rounds: int) -> float:
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for b in items:
            fn(b)
        per.append((time.perf_counter() - t) / len(items))
    return median(per) * 1e6


def compare_encodings(heatmaps: List[np.ndarray], rounds: int) -> List[dict]:
    rows = []
    for name, (enc, dec, _) in encodings(heatmaps[0].shape).items():
        blobs = [enc(h) for h in heatmaps]
        exact = all(np.array_equal(dec(b), h) for b, h in zip(blobs, heatmaps))
        err = max(int(np.abs(dec(b).astype(int) - h).max()) for b, h in zip(blobs, heatmaps))
        rows.append({"encoding": name, "bytes": float(np.mean([len(b) for b in blobs])),
                     "decode_us": time_decode(dec, blobs, rounds), "exact": exact, "max_abs_error": err})
    return rows


def real_face(tmp: str, size: int) -> dict:
    """One real photo through make_shards (dlib alignment): its JPEG and per-sample bytes."""
    from skimage import data

    folder = os.path.join(tmp, "photo")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(data.astronaut()).save(os.path.join(folder, "astronaut.png"))
    out = {}
    for version in (1, 2):
        root = os.path.join(tmp, f"photo-v{version}-{size}")
        make_shards(ShardJob(source="unlabeled", input=folder, out=root, extractor="dlib", image_size=size,
                             format_version=version), descriptor_dim=1, progress=False, log=lambda m: None)
        (s,) = set_members(root).values()
        out[f"v{version}"] = sum(member_bytes(len(b)) for b in s.values())
        if version == 1:
            out["jpeg"] = len(s["jpg"])
    return out


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=1400)
    ap.add_argument("--shard-size", type=int, default=350, help="the demo's: 2,800 faces in 8 shards")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gpu-rate", type=float, default=1300.0,
                    help="samples/s per GPU: ~2,600 images/s for ResNet-50 @ 224 px mixed precision on one A100 "
                         "(timm's benchmark, huggingface/pytorch-image-models#1491), two views per sample")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes, encodings_rows, photo = {}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (112, 224):
            v1 = os.path.join(tmp, f"v1-{size}")
            make_shards(ShardJob(source="synthetic", out=v1, format_version=1, image_size=size,
                                 source_options=(("num_samples", args.faces), ("seed", 0), ("size", size))),
                        shard_size=args.shard_size, descriptor_dim=64, progress=False, log=lambda m: None)
            v2 = os.path.join(tmp, f"v2-{size}")
            t = time.perf_counter()
            convert_shards(v1, v2, progress=False, log=lambda m: None)
            convert_s = time.perf_counter() - t
            s1, s2 = set_members(v1), set_members(v2)
            jpeg = float(np.mean([len(s["jpg"]) for s in s1.values()]))
            b1, b2 = per_sample(v1, s1), per_sample(v2, s2)
            two = two_member_v2(s2)
            sizes[size] = {"jpeg": jpeg, "v1": b1, "v2": b2, "v2_two_members": two,
                           "v1_over_jpeg": b1["members"] / jpeg, "v2_over_jpeg": b2["members"] / jpeg,
                           "v2_two_members_over_jpeg": two / jpeg, "v2_files_over_jpeg": b2["files"] / jpeg,
                           "v1_over_v2": b1["members"] / b2["members"],
                           "convert_ms_per_sample": convert_s / len(s1) * 1000,
                           "v2_payload_beyond_jpeg": float(np.mean([len(s["hncl"]) for s in s2.values()])) - jpeg}
            print(f"  {size} px: JPEG {jpeg:.0f} B, v1 {b1['members']:.0f} B/sample ({b1['members'] / jpeg:.2f}x), "
                  f"v2 {b2['members']:.0f} ({b2['members'] / jpeg:.2f}x), v2 as two members {two:.0f} "
                  f"({two / jpeg:.2f}x)", flush=True)
            if size == 112:
                heatmaps = [read_npy(s["heatmap.npy"]) for s in s1.values()][:700]
                encodings_rows = compare_encodings(heatmaps, args.rounds)
            try:
                photo[size] = real_face(tmp, size)
            except Exception as e:  # dlib or scikit-image missing: the synthetic figures stand alone
                print(f"  (real photo skipped: {type(e).__name__}: {e})")
    gpu = {}
    for size, s in sizes.items():
        gpu[size] = {f"v{v}_MB_per_s": s[f"v{v}"]["members"] * args.gpu_rate / 1e6 for v in (1, 2)}
        gpu[size]["jpeg_MB_per_s"] = s["jpeg"] * args.gpu_rate / 1e6
        gpu[size]["v1_GB_per_epoch_1M"] = s["v1"]["members"] * 1e6 / 1e9
        gpu[size]["v2_GB_per_epoch_1M"] = s["v2"]["members"] * 1e6 / 1e9
    write("shard_bytes", {"config": vars(args), "per_size": sizes, "encodings_112": encodings_rows, "real_photo": photo,
                          "s3_per_gpu": gpu})
    print(table([[f"{size} px", round(s["jpeg"]), round(s["v1"]["members"]), round(s["v2"]["members"]),
                  round(s["v2_two_members"]), round(s["v1_over_jpeg"], 2), round(s["v2_over_jpeg"], 2),
                  round(s["v2_two_members_over_jpeg"], 2), round(s["v2_files_over_jpeg"], 3)]
                 for size, s in sizes.items()],
                ["faces", "JPEG B", "v1 B/sample", "v2 B/sample", "v2 as 2 members", "v1 / JPEG", "v2 / JPEG",
                 "2 members / JPEG", "v2 files / JPEG"]))
    print(table([[r["encoding"], round(r["bytes"]), round(r["decode_us"], 1), r["exact"], r["max_abs_error"]]
                 for r in encodings_rows], ["heatmap encoding (68x16x16 uint8)", "bytes", "decode us", "exact",
                                            "max abs error"]))
    if photo:
        print(table([[f"{size} px", p["jpeg"], p["v1"], p["v2"], round(p["v1"] / p["jpeg"], 2),
                      round(p["v2"] / p["jpeg"], 2)] for size, p in photo.items()],
                    ["real photo", "JPEG B", "v1 B", "v2 B", "v1 / JPEG", "v2 / JPEG"]))
    print(table([[f"{size} px", round(g["jpeg_MB_per_s"], 1), round(g["v1_MB_per_s"], 1), round(g["v2_MB_per_s"], 1),
                  round(g["v1_GB_per_epoch_1M"], 1), round(g["v2_GB_per_epoch_1M"], 1)] for size, g in gpu.items()],
                [f"S3 per GPU at {args.gpu_rate:.0f} samples/s", "JPEG MB/s", "v1 MB/s", "v2 MB/s",
                 "v1 GB per epoch of 1M faces", "v2 GB per epoch of 1M faces"]))
    return sizes


if __name__ == "__main__":
    main()
