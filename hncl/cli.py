"""The `hncl` command: one entry point, one subcommand per job.

Subcommands whose feature has not landed yet say so and exit with status 2, so scripts never
mistake them for success.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from hncl.config import ConfigError, load_config, to_yaml

# subcommand -> (one-line help, tracker issue that builds it)
_PENDING: Dict[str, tuple] = {
    "pretrain": ("self-supervised HNCL pretraining (Ray Train, or --debug in one process)", 6),
    "finetune": ("linear probe / fine-tune a pretrained encoder on labelled FER shards", 7),
    "evaluate": ("accuracy, macro-F1, confusion matrix and kNN of a trained model", 7),
    "predict": ("predict expressions for an image or a folder of images", 7),
    "export": ("export a classifier to TorchScript / ONNX / safetensors", 7),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults in hncl/config.py")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.batch_size=64 method.topk=5")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    if args.preview:
        if args.source != "synthetic":
            print("hncl make-shards: --preview needs --source synthetic", file=sys.stderr)
            return 2
        from hncl.data.synthetic import SyntheticFaces, contact_sheet

        ds = SyntheticFaces(max(1, (args.num_samples + 6) // 7), 7, size=args.size, seed=args.seed)
        contact_sheet([ds[i] for i in range(min(args.num_samples, len(ds)))], args.preview)
        print(f"wrote {args.preview}: {min(args.num_samples, len(ds))} synthetic faces with landmarks")
        return 0
    print("hncl make-shards: writing shard sets is not built yet (tracked as issue #4); "
          "only --preview works. Nothing was written.", file=sys.stderr)
    return 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from hncl.demo import run_preview

    run_preview(args.out, seed=args.seed, steps=args.steps, quick=args.quick)
    return 0


def _pending(name: str, issue: int) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"hncl {name}: not built yet (tracked as issue #{issue}); nothing was run.", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hncl",
        description="Heatmap Neighbor Contrastive Learning for facial expression recognition.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the resolved, validated config (defaults <- FILE <- overrides)",
                       description="Print the resolved config as YAML; exits 1 naming the bad field.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("make-shards", help="turn a face dataset into WebDataset shards with heatmaps "
                       "(local or S3) [only --preview built yet]",
                       description="Build a shard set. Only --preview (a contact sheet of synthetic faces "
                       "with landmarks) is built yet; shard writing is tracked as issue #4.")
    p.add_argument("--source", default="synthetic", help="dataset source (synthetic)")
    p.add_argument("--num-samples", type=int, default=32, help="faces to generate (synthetic)")
    p.add_argument("--size", type=int, default=112, help="face size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", metavar="FILE", help="write a PNG contact sheet with landmarks drawn, then stop")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("demo", help="end-to-end preview on synthetic faces: heatmaps, descriptor, HNCL training",
                       description="Synthetic faces -> aligned heatmaps -> descriptor -> HNCL training in one "
                       "process; prints neighbour purity and loss, writes a report to --out. The full demo "
                       "with Ray, shards and baselines lands with issue #8.")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--quick", action="store_true", help="smaller data and at most 20 steps")
    p.set_defaults(func=_cmd_demo)

    for name, (text, issue) in _PENDING.items():
        p = sub.add_parser(name, help=f"{text} [not built yet]",
                           description=f"{text}. Not built yet: tracked as issue #{issue}.")
        if name in ("pretrain", "finetune", "evaluate"):
            _add_config_args(p)
        p.set_defaults(func=_pending(name, issue))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
