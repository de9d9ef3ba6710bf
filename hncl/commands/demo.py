"""`hncl demo`: HNCL against the two-view baseline and NNCLR on synthetic faces, end to end.

1. synthetic faces, disjoint train/test identities -> shard sets with aligned heatmaps
2. pretrain three times with the same budget (model, data, steps, batch, lr, temperature, queue):
   hncl (heatmap neighbours), baseline (two views only), nnclr (embedding neighbours, exactly
   NNCLR: neighbour term only)
3. linear probe and kNN of each frozen encoder on expression (held-out identities), and of a
   random-init encoder with the same probe (what pretraining adds)
4. report.json, report.md and PNGs (loss curves, confusion matrices, heatmap-neighbour grid),
   with each method's per-class accuracy

Default: Ray with 2 workers, faces at the "realistic" difficulty (hncl/data/synthetic.py: subtle and
personal expressions, head pose, detector-like landmark noise; nearest-heatmap purity 0.55-0.70 as
on real faces); --difficulty easy: the original faces (purity ~0.99); --debug: one process, no Ray;
--quick: a smaller, shorter run; --seeds 0-9: one run per seed and a summary (mean +- std, how often
HNCL is ahead).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional

import numpy as np

from hncl.config import SHARD_SET, load_config
from hncl.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hncl/commands/ -> the checkout
CONFIG = os.path.join(REPO, "configs", "demo.yaml")
QUEUE = {"method.queue_size": 2048, "method.topk": 1}  # hncl's and nnclr's, the same
METHODS = {  # demo name -> method settings (everything else is shared: configs/demo.yaml)
    # queue heatmap neighbour + every other face of the global batch of 128 as a soft positive,
    # weighted by softmax(heatmap cosine / 0.05): the heatmaps' graded similarity as the target,
    # not 5 equal neighbours of which 65% show another expression on realistic faces (chosen on
    # validation identities, README "Soft heatmap positives")
    "hncl": {"method.name": "hncl", **QUEUE, "method.batch_neighbours": 127, "method.batch_weight_temperature": 0.05,
             "method.batch_pool": "each"},
    "baseline": {"method.name": "simclr"},
    "nnclr": {"method.name": "nnclr", **QUEUE},
}
RANDOM = "random-init"  # the probe on an encoder nobody trained: the floor
SIZES = {  # (train identities, test identities, faces per identity, pretraining steps)
    "default": (200, 60, 14, 300),  # 300 steps: validation identities, benchmarks/demo_ablation.py (README)
    "quick": (40, 20, 14, 25),
}


DIFFICULTY = "realistic"  # the demo's faces (hncl.data.synthetic.DIFFICULTIES)


def _shards(out: str, split: str, ids: int, per_id: int, seed: int, difficulty: str, log) -> str:
    from hncl.data.make_shards import ShardJob, make_shards

    path = os.path.join(out, "shards", split)
    options = {"num_samples": ids * per_id, "seed": seed, "size": 112}
    if difficulty != SHARD_SET.synthetic_difficulty:
        options["difficulty"] = difficulty
    job = ShardJob(source="synthetic", out=path, split=split, source_options=tuple(sorted(options.items())))
    make_shards(job, shard_size=max(50, ids * per_id // 8), descriptor_dim=SHARD_SET.descriptor_dim, seed=seed,
                progress=False,
                log=lambda m: log(f"      {m}"))
    return path


def _training_purity(run_dir: str, key: str = "nn_purity") -> Optional[float]:
    """Mean label purity of the positives the queue (key nn_purity) or the in-batch neighbour
    search (batch_nn_purity) handed to the loss, second half of training."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    vals = [r[key] for r in rows[len(rows) // 2:] if isinstance(r.get(key), float) and r[key] == r[key]]
    return float(np.mean(vals)) if vals else None


def run_demo(out: str = "demo_out", seed: int = 0, quick: bool = False, debug: bool = False,
             steps: Optional[int] = None, identities: Optional[tuple] = None, difficulty: str = DIFFICULTY,
             log=print) -> Dict:
    t_start = time.time()
    n_train, n_test, per_id, default_steps = SIZES["quick" if quick else "default"]
    if identities:
        n_train, n_test = identities
    steps = steps or default_steps
    os.makedirs(out, exist_ok=True)
    log(f"[demo 1/4] synthetic faces ({difficulty}): {n_train * per_id} train ({n_train} identities), "
        f"{n_test * per_id} test ({n_test} other identities) -> shards with aligned heatmaps in {out}/shards")
    train = _shards(out, "train", n_train, per_id, seed, difficulty, log)
    test = _shards(out, "test", n_test, per_id, seed, difficulty, log)
    from hncl.data.synthetic import SyntheticFaces, contact_sheet

    faces = SyntheticFaces(4, 7, size=112, seed=seed, difficulty=difficulty)
    contact_sheet([faces[i] for i in range(28)], os.path.join(out, "faces.png"), columns=7)

    if not debug:
        from hncl.infra.raycluster import connect_ray

        log(f"[demo] Ray: {connect_ray(num_cpus=2)}")
    results: Dict[str, Dict] = {}
    for i, (name, method) in enumerate(METHODS.items(), 1):
        log(f"[demo 2/4] pretraining {i}/3: {name} ({steps} steps, global batch {_global_batch()}, "
            f"{'1 process' if debug else '2 Ray workers'})")
        results[name] = pretrain_method(out, name, method, train, seed, steps, debug)
    log("[demo 3/4] linear probe + kNN of each frozen encoder on expression (held-out identities)")

    results[RANDOM] = {"training_seconds": 0.0, "neighbour_purity": None, "batch_neighbour_purity": None}
    for name in [*METHODS, RANDOM]:
        results[name].update(probe(out, name, train, test, seed))
        shutil.copy(os.path.join(out, "probe", name, "confusion_matrix.png"), os.path.join(out, f"confusion_{name}.png"))
    shutil.copy(os.path.join(out, "probe", "hncl", "neighbour_grid.png"), os.path.join(out, "neighbour_grid.png"))
    log("[demo 4/4] report")
    _loss_curves(out)
    summary = {"seed": seed, "quick": quick, "debug": debug, "steps": steps, "difficulty": difficulty,
               "train_faces": n_train * per_id,
               "test_faces": n_test * per_id, "seconds": round(time.time() - t_start, 1), "methods": results}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({**results, "_run": {k: v for k, v in summary.items() if k != "methods"}}, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(_markdown(summary))
    log(_table(results))
    log(_per_class_table(results))
    log(f"faces: {difficulty}; the nearest heatmap of a test face shares its expression "
        f"{results['hncl']['heatmap_purity']:.3f} of the time (chance {results['hncl']['chance']:.3f})")
    if quick:
        log(QUICK_NOTE)
    log(f"done in {summary['seconds']:.0f}s: {out}/report.md")
    return summary


def pretrain_method(out: str, name: str, method: Dict, train: str, seed: int, steps: int, debug: bool = False) -> Dict:
    """Pretrain one method with the demo's shared settings into out/runs/name (a fresh run, not a
    resume): its time and the purity of the positives it was given."""
    from hncl.train.launch import pretrain

    workers, batch = (1 if debug else 2), _global_batch()
    run_dir = os.path.join(out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    common = {"data.train_shards": train, "run.output_dir": os.path.join(out, "runs"), "run.seed": seed,
              "data.steps_per_epoch": steps, "dist.num_workers": workers, "data.batch_size": batch // workers}
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in {**common, **method, "run.name": name}.items()])
    t0 = time.time()
    pretrain(cfg, debug=debug)
    return {"training_seconds": round(time.time() - t0, 1), "neighbour_purity": _training_purity(run_dir),
            "batch_neighbour_purity": _training_purity(run_dir, "batch_nn_purity")}


def _global_batch() -> int:
    """The demo's global batch: configs/demo.yaml's per-worker batch on 2 workers (also in one process)."""
    return 2 * load_config(CONFIG).data.batch_size


def probe(out: str, name: str, train: str, test: str, seed: int) -> Dict:
    """Linear probe and kNN of out/runs/name's frozen encoder (random-init: a fresh one) on the
    test identities' expressions, on the driver (the probe is small)."""
    from hncl.train.finetune import finetune_loop
    from hncl.train.launch import launch

    init = "none" if name == RANDOM else os.path.join(out, "runs", name, "encoder.safetensors")
    cfg = load_config(CONFIG, [f"finetune.train_shards={train}", f"finetune.test_shards={test}",
                               f"finetune.init={init}", f"run.output_dir={os.path.join(out, 'probe')}",
                               f"run.name={name}", f"run.seed={seed}", "data.loader_workers=1"])
    report = launch(cfg, finetune_loop, debug=True)
    return dict(linear_acc=report["accuracy"], linear_macro_f1=report["macro_f1"], knn_acc=report["knn"]["accuracy"],
                per_class_acc={c: round(v["recall"], 4) for c, v in report["per_class"].items()},
                embedding_purity=report["neighbours"].get("embedding_k1"),
                heatmap_purity=report["neighbours"]["heatmap_k1"], chance=report["neighbours"]["chance"])


def parse_seeds(text: str) -> List[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '1,5,7' -> [1, 5, 7]; '3' -> [3]."""
    seeds: List[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()) or (b and int(b) < int(a)):
            raise InputError(f"--seeds {text}: '{part}' is not a seed or an ascending range A-B (e.g. 0-4 or 1,5,7)")
        seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return seeds


def run_seeds(out: str, seeds: List[int], log=print, **kwargs) -> Dict:
    """One demo per seed in out/seed_S (reused when its report exists), then out/summary.json
    and summary.md: per-seed values, mean +- std, and in how many runs HNCL is ahead of both."""
    runs = {}
    quick = kwargs.get("quick", False)
    size = SIZES["quick" if quick else "default"]
    # one process (--debug) and Ray's 2 workers give other numbers for the same seed (per-rank
    # BatchNorm, the stream's split): kept runs of the other kind are refused too
    wanted = {"difficulty": kwargs.get("difficulty", DIFFICULTY), "quick": quick, "steps": kwargs.get("steps") or size[3],
              "train_faces": (kwargs.get("identities") or size)[0] * size[2], "debug": bool(kwargs.get("debug", False))}
    for seed in seeds:
        folder = os.path.join(out, f"seed_{seed}")
        report = os.path.join(folder, "report.json")
        if os.path.exists(report):
            with open(report) as f:
                kept = json.load(f).get("_run", {})
            made = {**{k: kept.get(k) for k in wanted}, "difficulty": kept.get("difficulty", "easy"),
                    "debug": bool(kept.get("debug", False))}
            if made != wanted:  # a summary must not mix runs of other settings
                differ = ", ".join(f"{k} {made[k]} (now {wanted[k]})" for k in wanted if made[k] != wanted[k])
                raise InputError(f"{report} was made with {differ}: use another --out, or remove {folder}")
            log(f"[demo] seed {seed}: kept {report}")
        else:
            log(f"[demo] seed {seed} of {seeds[0]}-{seeds[-1]}")
            run_demo(folder, seed=seed, log=log, **kwargs)
        with open(report) as f:
            runs[seed] = json.load(f)
    summary = summarise(runs)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary["markdown"])
    log(summary["markdown"])
    return summary


def summarise(runs: Dict[int, Dict]) -> Dict:
    names = [n for n in (*METHODS, RANDOM) if all(n in r for r in runs.values())]
    seeds = sorted(runs)
    stats = {}
    for name in names:
        for key in ("linear_acc", "knn_acc"):
            values = [runs[s][name][key] for s in seeds]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0  # the sample std over seeds
            stats.setdefault(name, {})[key] = {"mean": float(np.mean(values)), "std": std, "values": values}
    ahead = sum(all(runs[s]["hncl"]["linear_acc"] > runs[s][m]["linear_acc"] for m in ("baseline", "nnclr"))
                for s in seeds)
    margin = stats["hncl"]["linear_acc"]["mean"] - max(stats[m]["linear_acc"]["mean"] for m in ("baseline", "nnclr"))
    difficulty = runs[seeds[0]].get("_run", {}).get("difficulty", "easy")
    purity = [runs[s]["hncl"]["heatmap_purity"] for s in seeds]
    lines = [f"Demo over seeds {', '.join(map(str, seeds))}, {difficulty} faces (nearest-heatmap purity of the test faces "
             f"{np.mean(purity):.3f}): mean +- sample std (per-seed values in order)", "",
             "| method | linear-probe acc | kNN acc |", "|---|---|---|"]
    for name in names:
        cells = [f"{st['mean']:.3f} +- {st['std']:.3f} ({', '.join(f'{v:.3f}' for v in st['values'])})"
                 for st in (stats[name]["linear_acc"], stats[name]["knn_acc"])]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", f"HNCL ahead of both the baseline and NNCLR on linear-probe accuracy in {ahead} of {len(seeds)} "
              f"runs; mean margin over the better of the two {margin * 100:+.1f} points.", ""]
    return {"seeds": seeds, "difficulty": difficulty, "stats": stats, "hncl_ahead": ahead, "hncl_margin": margin, "markdown": "\n".join(lines)}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _per_class_table(results: Dict) -> str:
    classes = list(next(iter(results.values()))["per_class_acc"])
    lines = ["| per-class accuracy | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_class_acc'][c]:.2f}" for c in classes) + " |")
    return "\n".join(lines)


def _table(results: Dict) -> str:
    lines = ["| method | linear-probe acc | kNN acc | neighbour purity: queue positives | in-batch positives | "
             "embedding purity (k=1) | training time |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_fmt(r['linear_acc'])} | {_fmt(r['knn_acc'])} | {_fmt(r['neighbour_purity'])} | "
                     f"{_fmt(r.get('batch_neighbour_purity'))} | {_fmt(r['embedding_purity'])} | "
                     f"{r['training_seconds']:.0f} s |")
    return "\n".join(lines)


# --quick checks that the pipeline runs end to end; its numbers are not a comparison
QUICK_NOTE = ("quick mode: too short for the methods to separate (every accuracy is near chance); "
              "`hncl demo` without --quick is the comparison")


def _markdown(summary: Dict) -> str:
    any_r = next(iter(summary["methods"].values()))
    return "\n".join([
        "# hncl demo report", "",
        *([f"**{QUICK_NOTE}**", ""] if summary["quick"] else []),
        f"Synthetic faces: {summary['train_faces']} train / {summary['test_faces']} test (disjoint identities), "
        f"{summary['difficulty']} difficulty, seed {summary['seed']}, {summary['steps']} pretraining steps per method, "
        f"{'one process' if summary['debug'] else 'Ray, 2 workers'}; total {summary['seconds']:.0f} s.", "",
        _table(summary["methods"]), "",
        f"*{RANDOM}*: the same probe on a random-init encoder (no pretraining): what pretraining adds is the "
        "difference to it.", "",
        _per_class_table(summary["methods"]), "",
        f"Chance (label frequencies): {any_r['chance']:.3f}. Heatmap-descriptor neighbour purity on the test set: "
        f"{any_r['heatmap_purity']:.3f}. *Neighbour purity* is the fraction of the positives each method's queue "
        "supplied during the second half of training that share the anchor's expression (HNCL: heatmap "
        "neighbours, NNCLR: embedding neighbours, baseline: none); *in-batch positives*: the same for HNCL's "
        "heatmap neighbours within the global batch, each counted by its weight (soft positives). "
        "*Embedding purity*: the same for the "
        "nearest test face in the learned feature space.", "",
        "![loss curves](loss_curves.png)", "",
        "| HNCL | baseline | NNCLR |", "|---|---|---|",
        "| ![](confusion_hncl.png) | ![](confusion_baseline.png) | ![](confusion_nnclr.png) |", "",
        "Heatmap neighbours (what HNCL treats as positives): ![neighbour grid](neighbour_grid.png)", "",
        "The faces: ![faces](faces.png)", ""])


def _loss_curves(out: str) -> None:
    from hncl.evaluate.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name in METHODS:
        with open(os.path.join(out, "runs", name, "metrics.jsonl")) as f:
            rows = [json.loads(l) for l in f]
        axes[0].plot([r["step"] for r in rows], [r["loss_view"] for r in rows], label=name)
        if any("nn_purity" in r for r in rows):
            axes[1].plot([r["step"] for r in rows], [r.get("nn_purity") for r in rows], label=f"{name}: queue")
        if any("batch_nn_purity" in r for r in rows):
            axes[1].plot([r["step"] for r in rows], [r.get("batch_nn_purity") for r in rows], "--",
                         label=f"{name}: in-batch")
    axes[0].set_title("two-view InfoNCE term")
    axes[1].set_title("label purity of the neighbour positives")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=100)
    plt.close(fig)
