"""The demo pipeline end to end at a tiny size (one process): report structure and consistency."""

import json

from hncl.cli import main


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--debug", "--quick", "--steps", "4", "--identities", "6", "4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"hncl", "baseline", "nnclr", "_run"}
    for name in ("hncl", "baseline", "nnclr"):
        r = report[name]
        for key in ("linear_acc", "knn_acc", "neighbour_purity", "training_seconds", "embedding_purity"):
            assert key in r, (name, key)
        assert 0 <= r["linear_acc"] <= 1 and 0 <= r["knn_acc"] <= 1
        # the numbers come from the probe run's own metrics
        probe = json.loads((out / "probe" / name / "metrics.json").read_text())
        assert r["linear_acc"] == probe["accuracy"] and r["knn_acc"] == probe["knn"]["accuracy"]
        assert (out / f"confusion_{name}.png").exists()
    assert report["baseline"]["neighbour_purity"] is None  # no queue, no neighbours
    assert report["hncl"]["neighbour_purity"] > report["hncl"]["chance"]  # heatmap positives share expression
    assert report["hncl"]["batch_neighbour_purity"] > report["hncl"]["chance"]
    assert report["nnclr"]["batch_neighbour_purity"] is None
    md = (out / "report.md").read_text()
    assert "| hncl |" in md and "| baseline |" in md and "| nnclr |" in md and "loss_curves.png" in md
    for png in ("loss_curves.png", "neighbour_grid.png", "faces.png"):
        assert (out / png).stat().st_size > 1000
    assert "[demo 4/4]" in capsys.readouterr().out
