"""Data pipeline: training samples/s per CPU core, shards against a plain ImageFolder loader.

All variants produce what a training step consumes: two augmented views at --size px (and,
for ours, the stored heatmap), from the same faces. One process, one thread, no loader workers,
so the figure is per core. Variants:
  shards v2/per-sample views  hncl.data.shards.train_pipeline + torchvision v2 per image (hncl today)
  shards v2/batched views   the same decode, then one kornia call per batch for all views
  shards v2/decode only     tar + JPEG (libjpeg-turbo) + heatmap decode and collate, no views:
                            what the loader does with data.augment_on=device (format v2)
  shards v1/decode only     the same from the same faces in format v1 (four tar members per sample)
  imagefolder               torchvision ImageFolder + PIL loader, torchvision v2 views per image
  imagefolder+online heatmaps  the same plus dlib landmarks + heatmap rendering per image (what
                            precomputing heatmaps into the shards saves)
plus the parts of one sample: JPEG decode, heatmap decode, one view (torchvision), views (kornia).
Per round (the variants alternate), the decode-only ratios v2 / ImageFolder, v1 / ImageFolder
and v2 / v1 are reported as well as their medians. A variant's rate in a round is the fastest of
--chunks consecutive stretches of --samples samples, the same rule for every variant.

    python benchmarks/data_pipeline.py [--faces 1400 --size 64 --batch 64 --rounds 3]

Writes benchmarks/results/data_pipeline.json and .png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import Callable, Dict

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median, table, write  # noqa: E402

from hncl.data.augment import BatchViews, view_transform  # noqa: E402
from hncl.data.convert_shards import convert_shards  # noqa: E402
from hncl.data.make_shards import ShardJob, make_shards  # noqa: E402
from hncl.data.shard_format import decode_v2  # noqa: E402
from hncl.data.shards import ShardSet, decode_jpeg, read_npy, train_pipeline  # noqa: E402


def rate(batches, n_samples: int, chunks: int = 1) -> float:
    """Samples/s drawing batches until n_samples (first batch excluded: start-up); with chunks > 1,
    the fastest of that many consecutive stretches of n_samples (the least disturbed by other
    tenants of a shared machine: a burst of their load hits a short measurement hardest)."""
    it = iter(batches)
    first = next(it)
    bs = len(first["id"]) if isinstance(first, dict) else len(first[1])
    best = 0.0
    for _ in range(chunks):
        seen, t = 0, time.perf_counter()
        while seen < n_samples:
            next(it)
            seen += bs
        best = max(best, seen / (time.perf_counter() - t))
    return best


def imagefolder_root(shards: ShardSet, root: str) -> int:
    """The same JPEG bytes as one file per face in class folders (ImageFolder's layout), from a
    v2 set."""
    n = 0
    for url in shards.urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                sample = decode_v2(tf.extractfile(m).read())
                d = os.path.join(root, f"class{json.loads(sample.meta_json)['label']}")
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, m.name.split(".", 1)[0] + ".jpg"), "wb") as f:
                    f.write(sample.jpeg)
                n += 1
    return n


class TwoViewsPIL:
    def __init__(self, size: int, online_heatmaps: bool = False):
        from torchvision.transforms import v2

        self.to_tensor = v2.PILToTensor()
        self.view = view_transform(size)
        self.extractor = None
        if online_heatmaps:
            from hncl.heatmaps.extractors import DlibHeatmaps

            self.extractor = DlibHeatmaps(detect="auto")

    def __call__(self, im: Image.Image):
        x = self.to_tensor(im)
        out = {"x1": self.view(x), "x2": self.view(x)}
        if self.extractor is not None:
            from hncl.heatmaps.render import pool_heatmaps

            ex = self.extractor.extract(np.asarray(im)[None])
            out["heatmap"] = pool_heatmaps(ex.heatmaps)[0]
        return out


def per_sample(fn: Callable, items, repeat: int = 3) -> float:
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best.append((time.perf_counter() - t) / len(items))
    return median(best) * 1000


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=1400)
    ap.add_argument("--stored", type=int, default=112, help="face size stored in the shards / files")
    ap.add_argument("--size", type=int, default=64, help="training view size")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1024, help="samples timed per variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=3, help="per variant and round: the fastest of this many "
                    "stretches of --samples samples (1 = one stretch, as before)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from torchvision.datasets import ImageFolder

    with tempfile.TemporaryDirectory() as tmp:
        # the same faces in both formats: v1 written by make_shards, v2 converted from it
        make_shards(ShardJob(source="synthetic", out=os.path.join(tmp, "shards-v1"), split="bench", format_version=1,
                             source_options=(("num_samples", args.faces), ("seed", 0), ("size", args.stored))),
                    shard_size=max(64, args.faces // 8), descriptor_dim=64, progress=False, log=lambda m: None)
        convert_shards(os.path.join(tmp, "shards-v1"), os.path.join(tmp, "shards"), progress=False, log=lambda m: None)
        shards, shards_v1 = ShardSet.open(os.path.join(tmp, "shards")), ShardSet.open(os.path.join(tmp, "shards-v1"))
        bytes_per_sample = {f"v{v}": sum(os.path.getsize(u) for u in s.urls) / s.num_samples
                            for v, s in ((1, shards_v1), (2, shards))}
        imagefolder_root(shards, os.path.join(tmp, "folder"))
        batch_views = BatchViews(args.size)

        def shards_batched():
            for b in train_pipeline(shards, args.batch, shuffle_buffer=500):
                b["x1"], b["x2"] = batch_views(b.pop("image"))
                yield b

        def folder(online: bool):
            ds = ImageFolder(os.path.join(tmp, "folder"), transform=TwoViewsPIL(args.size, online))
            dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=0, drop_last=True)
            while True:
                yield from dl

        variants = {
            "shards v2/per-sample views": lambda: train_pipeline(shards, args.batch, shuffle_buffer=500,
                                                              view_transform=view_transform(args.size)),
            "shards v2/batched views": shards_batched,
            "shards v2/decode only": lambda: train_pipeline(shards, args.batch, shuffle_buffer=500),
            "shards v1/decode only": lambda: train_pipeline(shards_v1, args.batch, shuffle_buffer=500),
            "imagefolder": lambda: folder(False),
        }
        rates: Dict[str, list] = {k: [] for k in variants}
        for r in range(args.rounds):  # alternate the variants: shared-machine noise hits all alike
            for name, make in variants.items():
                rates[name].append(rate(make(), args.samples, args.chunks))
                print(f"  {name}: {rates[name][-1]:.0f} samples/s", flush=True)
            v2, v1, base = (rates[k][-1] for k in ("shards v2/decode only", "shards v1/decode only", "imagefolder"))
            print(f"  round {r + 1}: decode only v2 / ImageFolder {v2 / base:.2f}x, v1 / ImageFolder "
                  f"{v1 / base:.2f}x, v2 / v1 {v2 / v1:.2f}x", flush=True)
        online = rate(folder(True), max(args.batch * 3, args.samples // 8))
        print(f"  imagefolder+online heatmaps: {online:.0f} samples/s", flush=True)

        # the parts of one sample
        with tarfile.open(shards_v1.urls[0]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        with tarfile.open(shards.urls[0]) as tf:
            hncl = [tf.extractfile(m).read() for m in tf.getmembers()][:200]
        jpgs = [v for k, v in members.items() if k.endswith(".jpg")][:200]
        npys = [v for k, v in members.items() if k.endswith(".heatmap.npy")][:200]
        v1_rest = [(members[k], members[k.replace(".heatmap.npy", ".landmarks.npy")],
                    members[k.replace(".heatmap.npy", ".json")]) for k in members if k.endswith(".heatmap.npy")][:200]
        images = [torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1).contiguous()
                  for b in jpgs]
        vt = view_transform(args.size)
        stack = torch.stack(images[: args.batch])
        parts = {
            "jpeg decode, PIL (ImageFolder)": per_sample(lambda b: np.array(Image.open(io.BytesIO(b)).convert("RGB")), jpgs),
            "jpeg decode, hncl (simplejpeg)": per_sample(decode_jpeg, jpgs),
            "heatmap decode, np.load": per_sample(lambda b: np.load(io.BytesIO(b), allow_pickle=False), npys),
            "heatmap decode, hncl (read_npy)": per_sample(read_npy, npys),
            "v1: heatmap + landmarks (read_npy) + metadata (json), no JPEG":
                per_sample(lambda t: (read_npy(t[0]), read_npy(t[1]), json.loads(t[2])), v1_rest),
            "v2: KEY.hncl (header, zlib, heatmap boxes, landmarks, json), no JPEG":
                per_sample(lambda b: json.loads(decode_v2(b, 16).meta_json), hncl),
            "two views, torchvision per sample": per_sample(lambda im: (vt(im), vt(im)), images),
            "two views, kornia per batch": per_sample(lambda _: batch_views(stack), [0] * 5) / args.batch,
        }
    med = {k: median(v) for k, v in rates.items()}
    med["imagefolder+online heatmaps"] = online
    base = med["imagefolder"]
    per_round = {
        "v2_decode_only_vs_imagefolder": [a / b for a, b in zip(rates["shards v2/decode only"], rates["imagefolder"])],
        "v1_decode_only_vs_imagefolder": [a / b for a, b in zip(rates["shards v1/decode only"], rates["imagefolder"])],
        "v2_vs_v1_decode_only": [a / b for a, b in zip(rates["shards v2/decode only"], rates["shards v1/decode only"])],
    }
    write("data_pipeline", {"config": vars(args), "samples_per_s_per_core": med, "rounds": rates,
                            "ratios_per_round": per_round, "bytes_per_sample": bytes_per_sample,
                            "ms_per_sample": parts, "ratio_vs_imagefolder": {k: v / base for k, v in med.items()}})
    _plot(med, base)
    print(table([[k, round(v), round(v / base, 2)] for k, v in med.items()],
                ["variant (1 core)", "samples/s", "x ImageFolder"]))
    print(table([[k, round(v, 3)] for k, v in parts.items()], ["part", "ms per sample"]))
    print(table([[r + 1] + [round(per_round[k][r], 2) for k in per_round] for r in range(args.rounds)],
                ["round", "decode only v2 / ImageFolder", "v1 / ImageFolder", "v2 / v1"]))
    print(f"shard bytes per sample: v1 {bytes_per_sample['v1']:.0f}, v2 {bytes_per_sample['v2']:.0f}")
    return med


def _plot(med, base) -> None:
    from hncl.evaluate.plots import plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(med)
    ax.barh(range(len(names)), [med[n] for n in names], color=["C0", "C2", "C7", "C8", "C1", "C3"][: len(names)])
    ax.set_yticks(range(len(names)), names)
    ax.axvline(base * 5, ls="--", c="k", lw=0.8)
    ax.text(base * 5, len(names) - 0.5, " 5x ImageFolder (target)", fontsize=7)
    ax.set_xlabel("training samples/s, one core")
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
