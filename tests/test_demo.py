"""The preview demo runs end to end on tiny data and its numbers mean what they say."""

import json

from hncl.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "6", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 7))
    assert summary["training"]["first_loss"] == lines[0]["loss"]
    assert all(l["loss"] == l["loss"] for l in lines)  # no NaN
    # the premise: heatmap neighbours share expression far above chance and above raw pixels
    p = summary["purity"]
    assert p["heatmap_descriptor"] > 0.8 > p["raw_pixels"] and p["chance"] < 0.2
    assert lines[-1]["queue_fill"] > 0  # the queue filled and handed out neighbours
    assert (tmp_path / "faces.png").exists() and (tmp_path / "descriptor.npz").exists()
    assert "[4/4]" in capsys.readouterr().out
