"""Who are a face's neighbours? Expression (label) and identity agreement of the nearest
neighbour by heatmap descriptor and by encoder embedding, on a synthetic shard set.

The diagnosis behind the demo's HNCL setting: the nearest heatmap is nearly always the same
expression, but often the same *person* in another photo; the nearest embedding (what NNCLR
uses) is nearly always the same person, and rarely the same expression.

    python benchmarks/neighbour_identity.py SHARDS [--encoder RUN/encoder.safetensors ...]

Writes benchmarks/results/neighbour_identity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from typing import Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import table, write  # noqa: E402

from hncl.core.model import ResNetEncoder, load_encoder_weights  # noqa: E402
from hncl.data.shard_format import decode_v2  # noqa: E402
from hncl.data.shards import ShardSet  # noqa: E402
from hncl.evaluate.features import extract  # noqa: E402


def identities(shards: ShardSet) -> Dict[int, int]:
    """Sample id -> synthetic identity, from the shards' JSON metadata (format v1 or v2)."""
    out = {}
    for url in shards.urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):  # v1
                    meta = json.loads(tf.extractfile(m).read())
                elif m.name.endswith(".hncl"):  # v2
                    meta = decode_v2(tf.extractfile(m).read()).meta
                else:
                    continue
                out[int(meta["id"])] = int(meta["identity"])
    return out


def nearest(features: torch.Tensor) -> torch.Tensor:
    x = F.normalize(features.float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("--encoder", nargs="*", default=[], help="encoder.safetensors files ('none' = random init)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    shards = ShardSet.open(args.shards)
    ident = identities(shards)
    data = extract(shards, None, args.size, "cpu", workers=0)
    labels = torch.as_tensor(data["label"])
    people = torch.tensor([ident[int(i)] for i in data["id"]])
    desc = shards.descriptor()(torch.as_tensor(data["heatmap"]))
    rows = {}

    def record(name: str, nn: torch.Tensor) -> None:
        rows[name] = {"same_expression": float((labels[nn] == labels).float().mean()),
                      "same_person": float((people[nn] == people).float().mean())}

    record("heatmap descriptor", nearest(desc))
    for path in args.encoder or ["none"]:
        torch.manual_seed(0)
        enc = ResNetEncoder(args.arch, args.width, "imagenet")
        if path != "none":
            load_encoder_weights(enc, path)
        with torch.no_grad():
            feats = torch.as_tensor(extract(shards, enc, args.size, "cpu", workers=0)["feats"])
        record(f"encoder embedding ({'random init' if path == 'none' else path})", nearest(feats))
    n_people = len(set(people.tolist()))
    chance = {"same_expression": float(sum((labels == c).float().mean() ** 2 for c in labels.unique())),
              "same_person": float(sum((people == p).float().mean() ** 2 for p in people.unique()))}
    rows["chance"] = chance
    write("neighbour_identity", {"shards": args.shards, "faces": len(labels), "people": n_people, "rows": rows})
    print(table([[k, round(v["same_expression"], 3), round(v["same_person"], 3)] for k, v in rows.items()],
                ["nearest neighbour by", "same expression", "same person"]))
    return rows


if __name__ == "__main__":
    main()
