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
    "make-shards": ("turn a face dataset into WebDataset shards with heatmaps (local or S3)", 4),
    "pretrain": ("self-supervised HNCL pretraining (Ray Train, or --debug in one process)", 6),
    "finetune": ("linear probe / fine-tune a pretrained encoder on labelled FER shards", 7),
    "evaluate": ("accuracy, macro-F1, confusion matrix and kNN of a trained model", 7),
    "predict": ("predict expressions for an image or a folder of images", 7),
    "export": ("export a classifier to TorchScript / ONNX / safetensors", 7),
    "demo": ("pretrain HNCL and two baselines on synthetic faces and compare them", 8),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults in hncl/config.py")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.batch_size=64 method.topk=5")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
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
