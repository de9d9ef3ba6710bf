"""The `hncl` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from hncl.config import SHARD_SET, ConfigError, load_config, to_yaml
from hncl.data.synthetic import DIFFICULTIES
from hncl.errors import InputError, one_line, user_error_in
from hncl.heatmaps.detect import DETECT_MODES
from hncl.infra import tempfiles


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults in hncl/config.py")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.batch_size=64 method.topk=5")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    if args.source != "synthetic" and args.difficulty != SHARD_SET.synthetic_difficulty:
        raise InputError("--difficulty is for --source synthetic (real faces are as hard as they are)")
    if args.preview:
        if args.source != "synthetic":
            print("hncl make-shards: --preview needs --source synthetic", file=sys.stderr)
            return 2
        from hncl.data.synthetic import SyntheticFaces, contact_sheet

        n = 32 if args.num_samples is None else args.num_samples
        if n < 1:
            print(f"hncl make-shards: error: --num-samples must be >= 1, got {n}", file=sys.stderr)
            return 1
        ds = SyntheticFaces(max(1, (n + 6) // 7), 7, size=args.image_size, seed=args.seed, difficulty=args.difficulty)
        contact_sheet([ds[i] for i in range(min(n, len(ds)))], args.preview)
        print(f"wrote {args.preview}: {min(n, len(ds))} synthetic faces with landmarks")
        return 0
    from hncl.data.make_shards import ShardJob, make_shards

    if not args.out:
        print("hncl make-shards: --out DIR_OR_S3_URL is required", file=sys.stderr)
        return 2
    source_opts = {}
    if args.source == "synthetic":
        source_opts = {"num_samples": SHARD_SET.synthetic_samples if args.num_samples is None else args.num_samples, "seed": args.seed, "size": args.image_size}
        if args.difficulty != SHARD_SET.synthetic_difficulty:  # the default leaves the options (and older sets' keys) as they were
            source_opts["difficulty"] = args.difficulty
    elif args.num_classes and args.source in ("affectnet", "ferplus"):
        source_opts = {"num_classes": args.num_classes}
    ext_opts = {}
    if args.extractor == "fan":
        ext_opts = {"device": args.device, "weights": args.fan_weights, "download": args.download}
    elif args.extractor == "dlib":
        ext_opts = {"detect": args.dlib_detect}
    job = ShardJob(source=args.source, out=args.out.rstrip("/"), input=args.input, split=args.split,
                   source_options=tuple(sorted(source_opts.items())), extractor=args.extractor,
                   extractor_options=tuple(sorted(ext_opts.items())), image_size=args.image_size,
                   resolution=args.resolution, format_version=args.format)
    try:
        make_shards(job, shard_size=args.shard_size, workers=args.workers, ray_address=args.ray,
                    max_skip_fraction=args.max_skip_fraction, descriptor_dim=args.descriptor_dim,
                    inner_only=not args.all_points, seed=args.seed, readers=args.readers,
                    command=" ".join(["hncl", "make-shards", *sys.argv[2:]]), progress=not args.quiet)
    except ValueError as e:  # a bad option value (e.g. --shard-size 0)
        print(f"hncl make-shards: error: {e}", file=sys.stderr)
        return 1
    return 0


def _named_run(args: argparse.Namespace, default_name) -> list:
    """The overrides, plus run.name=default_name(cfg) unless the command line sets run.name:
    finetune and evaluate get folders of their own instead of the config's pretraining run."""
    if any(o.split("=", 1)[0].strip() == "run.name" for o in args.overrides):
        return list(args.overrides)
    return [*args.overrides, f"run.name={default_name(load_config(args.config, args.overrides))}"]


def _cmd_convert_shards(args: argparse.Namespace) -> int:
    from hncl.data.convert_shards import convert_shards

    convert_shards(args.src, args.out, workers=args.workers, ray_address=args.ray, progress=not args.quiet,
                   command=" ".join(["hncl", "convert-shards", *sys.argv[2:]]))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from hncl.infra import preflight

    cfg = load_config(args.config, args.overrides)
    preflight.pretrain(cfg, debug=args.debug)
    from hncl.train.launch import pretrain

    pretrain(cfg, debug=args.debug, address=args.address)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from hncl.infra import preflight
    from hncl.train.finetune import finetune_loop
    from hncl.train.launch import FINETUNE_INPUTS, launch

    cfg = load_config(args.config, _named_run(args, lambda c: f"{c.run.name}-{c.finetune.protocol.value}"))
    preflight.finetune(cfg)
    preflight.own_run_dir(cfg, "finetune")
    launch(cfg, finetune_loop, debug=args.debug, address=args.address, inputs=FINETUNE_INPUTS)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import os

    from hncl.evaluate.report import evaluate
    from hncl.infra import preflight

    def default_name(c) -> str:
        return os.path.basename(os.path.normpath(c.finetune.checkpoint or "model")) + "-eval"

    cfg = load_config(args.config, _named_run(args, default_name))
    preflight.evaluate(cfg)
    preflight.own_run_dir(cfg, "evaluate")
    evaluate(cfg)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from hncl.commands.predict import format_table, predict, write_rows

    rows = predict(args.checkpoint, args.target, align=args.align)
    print(format_table(rows))
    classified = sum(r["status"] == "ok" for r in rows)
    for r in rows:
        if r["status"] != "ok":
            print(f"not classified: {r['file']}: {r['status']}", file=sys.stderr)
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows ({classified} classified) to {args.out}")
    return 0 if classified or not rows else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from hncl.commands.export import export

    report = export(args.checkpoint, args.out)
    print(f"TorchScript {report['torchscript']} (max |diff| {report['torchscript_max_abs_diff']:.2e}), "
          f"ONNX {report['onnx']} (max |diff| {report['onnx_max_abs_diff']:.2e}) vs PyTorch")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hncl.commands.demo import parse_seeds, run_demo, run_seeds

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.identities and min(args.identities) < 1:
        raise InputError(f"--identities must be >= 1 each (train, test), got {' '.join(map(str, args.identities))}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    options = dict(quick=args.quick, debug=args.debug, steps=args.steps, difficulty=args.difficulty,
                   identities=tuple(args.identities) if args.identities else None)
    if args.seeds:
        run_seeds(args.out, parse_seeds(args.seeds), **options)
    else:
        run_demo(args.out, seed=args.seed, **options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hncl",
        description="Heatmap Neighbor Contrastive Learning for facial expression recognition.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the resolved, validated config (defaults <- FILE <- overrides)",
                       description="Print the resolved config as YAML; exits 1 naming the bad field.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("make-shards", help="turn a face dataset into WebDataset shards with heatmaps (local or S3)",
                       description="Build a shard set: aligned faces + landmark heatmaps + labels, a PCA "
                       "descriptor and a manifest. Resumable: rerun the same command after an interruption.")
    p.add_argument("--source", default="synthetic",
                   choices=["synthetic", "folder", "unlabeled", "rafdb", "affectnet", "fer2013", "ferplus"])
    p.add_argument("--input", metavar="PATH", help="dataset root (or CSV); not for synthetic")
    p.add_argument("--num-samples", type=int, help=f"faces to generate (synthetic; default {SHARD_SET.synthetic_samples})")
    p.add_argument("--difficulty", default=SHARD_SET.synthetic_difficulty, choices=list(DIFFICULTIES),
                   help="synthetic: easy (every expression at 0.5-1 intensity, frontal, exact landmarks), "
                        "realistic (subtle and personal expressions, head pose, detector-like landmark noise) or "
                        "realistic-no-KNOB (one knob of hncl/data/synthetic.py at its easy value)")
    p.add_argument("--out", metavar="DIR_OR_S3_URL", help="output folder, e.g. shards/NAME or s3://bucket/prefix")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--extractor", default="landmarks", choices=["landmarks", "dlib", "fan"],
                   help="landmarks: given points (synthetic, affectnet); dlib: offline 68-point model; fan: 2D-FAN-4")
    p.add_argument("--shard-size", type=int, default=SHARD_SET.shard_size, help="rows per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="local processes (ignored with --ray)")
    p.add_argument("--ray", metavar="ADDRESS", help="run shards as Ray tasks on a cluster: its address (HOST:PORT, ray://HOST:PORT), 'auto' (the "
                   "cluster $RAY_ADDRESS names or the one running on this machine) or 'local' (a private instance)")
    p.add_argument("--image-size", type=int, default=SHARD_SET.image_size, help="aligned face size in pixels")
    p.add_argument("--resolution", type=int, default=SHARD_SET.resolution, choices=[4, 8, 16, 32, 64],
                   help="stored heatmap R")
    p.add_argument("--descriptor-dim", type=int, default=SHARD_SET.descriptor_dim)
    p.add_argument("--all-points", action="store_true", help="descriptor on all 68 points (default: inner 51)")
    p.add_argument("--max-skip-fraction", type=float, default=SHARD_SET.max_skip_fraction, help="fail above this fraction of skipped rows")
    p.add_argument("--num-classes", type=int, choices=[7, 8], help="affectnet / ferplus: with contempt (8) or not")
    p.add_argument("--readers", type=int, help="expected ranks x loader workers (warns if more than shards)")
    p.add_argument("--device", default="cpu", help="fan: torch device")
    p.add_argument("--fan-weights", metavar="FILE", help="fan: 2DFAN4 weights file")
    p.add_argument("--download", action="store_true", help="fan: download weights if missing")
    p.add_argument("--dlib-detect", default="always", choices=list(DETECT_MODES),
                   help="dlib: how faces are found. " + "; ".join(f"{k}: {v}" for k, v in DETECT_MODES.items()))
    p.add_argument("--format", type=int, default=2, choices=[1, 2],
                   help="shard format: 2 (one tar member per sample, ~1.2-1.5x the JPEG bytes); 1 only for "
                   "readers older than hncl-shards/2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preview", metavar="FILE", help="only write a PNG contact sheet of synthetic faces with landmarks")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("convert-shards", help="rewrite a v1 shard set in format v2 (no landmark extraction)",
                       description="Convert a finished hncl-shards/1 set to hncl-shards/2 from its stored "
                       "members: same samples, keys and order, new manifest, descriptor copied. Local or S3; "
                       "resumable: rerun the same command after an interruption.")
    p.add_argument("src", metavar="SRC", help="the v1 set (folder or s3:// URL)")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_URL", help="where the v2 set goes (not SRC)")
    p.add_argument("--workers", type=int, default=1, help="local processes (ignored with --ray)")
    p.add_argument("--ray", metavar="ADDRESS", help="run shards as Ray tasks: 'auto', 'local' or ray://HOST:PORT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert_shards)

    p = sub.add_parser("pretrain", help="self-supervised HNCL pretraining on a shard set (Ray Train, or --debug)",
                       description="Pretrain with Ray Train (one worker per rank, DDP or DeepSpeed, restarts "
                       "from the last checkpoint on failure; rerunning the same run.name resumes). --debug runs "
                       "the same loop in this process without Ray (also one rank per process under torchrun).")
    _add_config_args(p)
    p.add_argument("--debug", action="store_true", help="run in this process, no Ray")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray instance)")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("finetune", help="linear probe or fine-tune an encoder on labelled FER shards",
                       description="finetune.protocol=linear (frozen encoder) or finetune (end to end) from "
                       "finetune.init (encoder.safetensors, a torchvision ResNet state dict, or none); writes "
                       "metrics.json, confusion_matrix.png, curves.png and classifier.safetensors to the run directory.")
    _add_config_args(p)
    p.add_argument("--debug", action="store_true", help="run in this process, no Ray")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray instance)")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="accuracy, macro-F1, confusion matrix, kNN and neighbour diagnostics",
                       description="Evaluate finetune.checkpoint (classifier.safetensors) on finetune.test_shards, "
                       "with kNN against finetune.train_shards; writes metrics.json and PNGs to the run directory.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="predict expressions for an image or a folder of images",
                       description="Per image: the predicted expression and class probabilities, or a status "
                       "saying why there is none (unreadable file; with --align dlib: no face detected).")
    p.add_argument("target", metavar="IMAGE_OR_DIR")
    p.add_argument("--checkpoint", required=True, help="classifier.safetensors (or its folder)")
    p.add_argument("--align", default="none", choices=["none", "dlib"],
                   help="none: centre square crop + resize (every image is taken to be a face); dlib: find "
                   "the face (largest of several) and align it on eyes and nose like make_shards")
    p.add_argument("--out", help="write predictions as .json or .csv")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a classifier to TorchScript / ONNX / safetensors",
                       description="Write TorchScript and ONNX models and check both against PyTorch.")
    p.add_argument("--checkpoint", required=True, help="classifier.safetensors (or its folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)

    from hncl.commands.demo import DIFFICULTY as DEMO_DIFFICULTY

    p = sub.add_parser("demo", help="HNCL vs the two-view baseline vs NNCLR on synthetic faces, end to end",
                       description="Synthetic faces -> shards -> pretrain HNCL, baseline and NNCLR with the same "
                       "budget -> linear probe + kNN on expression -> DIR/report.md, report.json and PNGs. "
                       "Default: Ray with 2 workers, under 15 minutes on 2 CPU cores.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", metavar="LIST", help="several runs, e.g. 0-4 or 1,5,7: DIR/seed_S each, then "
                   "DIR/summary.md with mean +- std (a run whose report exists is kept)")
    p.add_argument("--quick", action="store_true", help="smaller and shorter (about 3 minutes)")
    p.add_argument("--debug", action="store_true", help="one process, no Ray")
    p.add_argument("--steps", type=int, help="pretraining steps per method (default 300, quick 25)")
    p.add_argument("--identities", type=int, nargs=2, metavar=("TRAIN", "TEST"), help="identities per split")
    p.add_argument("--difficulty", default=DEMO_DIFFICULTY, choices=list(DIFFICULTIES),
                   help=f"the faces (default {DEMO_DIFFICULTY}: nearest-heatmap purity as on real faces; easy: ~0.99)")
    p.set_defaults(func=_cmd_demo)

    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tempfiles.sweep_orphans_once()
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # what the user can fix is one line; anything else is a bug: traceback
        cause = user_error_in(e)
        if cause is None:
            raise
        if isinstance(cause, ConfigError) and os.environ.get("TORCHELASTIC_RUN_ID") and \
                os.environ.get("RANK", "0") != "0":
            return 1  # every torchrun rank refuses the same config: rank 0's line says it once
        message = one_line(cause)
        if not message.startswith("config error"):
            message = f"error: {message}"
        print(f"hncl {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
