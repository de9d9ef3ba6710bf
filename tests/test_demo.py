"""The demo pipeline end to end at a tiny size (one process, two seeds): each run's report, its
consistency with the probe runs behind it, and the multi-seed summary."""

import json

import numpy as np
import pytest

from hncl.cli import main
from hncl.commands.demo import RANDOM, parse_seeds


def test_seeds_never_mix_kept_runs_of_other_settings(tmp_path):
    """A kept seed_S/report.json made at another difficulty (or size, steps, one process or Ray) is refused in one
    line before anything runs: a summary over mixed settings would be a wrong claim."""
    from hncl.commands.demo import SIZES, run_seeds
    from hncl.errors import InputError

    kept = tmp_path / "seed_0"
    kept.mkdir()
    made = {"seed": 0, "quick": True, "steps": 4, "train_faces": 6 * SIZES["quick"][2]}  # no key: made before #24, easy
    (kept / "report.json").write_text(json.dumps({"_run": made}))
    with pytest.raises(InputError, match=r"seed_0/report.json was made with difficulty easy \(now realistic\)"):
        run_seeds(str(tmp_path), [0, 1], quick=True, steps=4, identities=(6, 4))
    with pytest.raises(InputError, match=r"steps 4 \(now 5\)"):
        run_seeds(str(tmp_path), [0, 1], quick=True, steps=5, identities=(6, 4), difficulty="easy")
    # a one-process run is not a Ray run: the same seed gives other numbers
    with pytest.raises(InputError, match=r"debug False \(now True\)"):
        run_seeds(str(tmp_path), [0, 1], quick=True, steps=4, identities=(6, 4), difficulty="easy", debug=True)
    assert not (tmp_path / "seed_1").exists()


def test_seed_lists():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("1,5,7") == [1, 5, 7] and parse_seeds("3") == [3]


def test_demo_tiny_end_to_end_over_two_seeds(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--debug", "--quick", "--steps", "4", "--identities", "6", "4", "--out", str(out),
                 "--seeds", "0-1"]) == 0
    reports = {s: json.loads((out / f"seed_{s}" / "report.json").read_text()) for s in (0, 1)}
    for seed, report in reports.items():
        run = out / f"seed_{seed}"
        assert set(report) == {"hncl", "baseline", "nnclr", RANDOM, "_run"} and report["_run"]["seed"] == seed
        for name in ("hncl", "baseline", "nnclr", RANDOM):
            r = report[name]
            assert 0 <= r["linear_acc"] <= 1 and 0 <= r["knn_acc"] <= 1
            # the numbers come from the probe run's own metrics, per class too
            probe = json.loads((run / "probe" / name / "metrics.json").read_text())
            assert r["linear_acc"] == probe["accuracy"] and r["knn_acc"] == probe["knn"]["accuracy"]
            assert r["per_class_acc"] == {c: round(v["recall"], 4) for c, v in probe["per_class"].items()}
            assert (run / f"confusion_{name}.png").exists()
        assert json.loads((run / "probe" / RANDOM / "metrics.json").read_text())["init"] == "none"
        assert report["baseline"]["neighbour_purity"] is None  # no queue, no neighbours
        assert report["hncl"]["neighbour_purity"] > report["hncl"]["chance"]  # heatmap positives share expression
        assert report["hncl"]["batch_neighbour_purity"] > report["hncl"]["chance"]
        assert report["nnclr"]["batch_neighbour_purity"] is None
        md = (run / "report.md").read_text()
        assert "| hncl |" in md and "| baseline |" in md and f"| {RANDOM} |" in md and "per-class accuracy" in md
        assert "quick mode: too short for the methods to separate" in md  # --quick says it is no comparison
        for png in ("loss_curves.png", "neighbour_grid.png", "faces.png"):
            assert (run / png).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    for name in ("hncl", "baseline", "nnclr", RANDOM):
        values = [reports[s][name]["linear_acc"] for s in (0, 1)]
        st = summary["stats"][name]["linear_acc"]
        assert st["values"] == values and abs(st["mean"] - np.mean(values)) < 1e-12 and abs(st["std"] - np.std(values, ddof=1)) < 1e-12
    ahead = sum(reports[s]["hncl"]["linear_acc"] > max(reports[s][m]["linear_acc"] for m in ("baseline", "nnclr"))
                for s in (0, 1))
    assert summary["hncl_ahead"] == ahead and f"in {ahead} of 2 runs" in (out / "summary.md").read_text()
    assert "[demo 4/4]" in capsys.readouterr().out
