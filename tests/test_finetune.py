"""Fine-tune, evaluate, predict and export, on tiny synthetic shard sets."""

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from hncl.cli import main
from hncl.data.make_shards import ShardJob, make_shards
from hncl.evaluate import knn
from hncl.evaluate.metrics import classification_report, confusion_matrix

CLASSES3 = ["a", "b", "c"]


def test_metrics_against_hand_computed_values():
    cm = np.array([[5, 1, 0],
                   [2, 2, 0],
                   [0, 3, 7]])
    r = classification_report(cm, CLASSES3)
    assert r["accuracy"] == pytest.approx(14 / 20)
    # recalls 5/6, 2/4, 7/10 ; precisions 5/7, 2/6, 7/7
    assert r["mean_class_accuracy"] == pytest.approx((5 / 6 + 2 / 4 + 7 / 10) / 3)
    f1 = [2 * p * q / (p + q) for p, q in ((5 / 7, 5 / 6), (2 / 6, 2 / 4), (1.0, 0.7))]
    assert r["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert r["per_class"]["b"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": f1[1], "support": 4})
    assert r["confusion_matrix"] == cm.tolist()
    assert confusion_matrix([0, 0, 2, 1], [0, 1, 2, 1], 3).tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    # a class never seen nor predicted does not dilute macro-F1 or mean class accuracy
    r4 = classification_report(np.pad(cm, ((0, 1), (0, 1))), CLASSES3 + ["d"])
    assert r4["macro_f1"] == pytest.approx(r["macro_f1"]) and r4["mean_class_accuracy"] == pytest.approx(
        r["mean_class_accuracy"])


def test_knn_vote_purity_and_ivf():
    train = np.array([[1, 0.1], [1, -0.1], [0.9, 0], [-1, 0.1], [-1, -0.1]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    test = np.array([[1, 0], [-1, 0], [0.2, 1]], dtype=np.float32)
    assert knn.knn_predict(train, labels, test, 2, k=2).tolist()[:2] == [0, 1]
    # k = 5 takes every sample: three class-0 votes against two, but exp(cos / T) weights decide
    assert knn.knn_predict(train, labels, np.array([[-1, 0]], np.float32), 2, k=5, temperature=0.05).tolist() == [1]
    assert knn.neighbour_purity(train, labels, k=1) == 1.0
    assert knn.chance_purity(labels) == pytest.approx(0.6 ** 2 + 0.4 ** 2)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))
    x = np.concatenate([c + 0.3 * rng.normal(size=(600, 32)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(10), 600)
    q = (centres + 0.3 * rng.normal(size=(10, 32))).astype(np.float32)
    assert knn.knn_predict(x, y, q, 10, k=10, kind="ivf").tolist() == list(range(10))


def test_both_faiss_builds_installed_is_refused(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "1.15.1")  # pretend every package is installed
    with pytest.raises(RuntimeError, match="both faiss-cpu and faiss-gpu"):
        knn.check_single_faiss()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    out = {}
    for split, n in (("train", 196), ("test", 98)):
        job = ShardJob(source="synthetic", out=str(root / split), split=split,
                       source_options=(("num_samples", n), ("seed", 1), ("size", 112)))
        make_shards(job, shard_size=49, descriptor_dim=16, progress=False, log=lambda *_: None)
        out[split] = str(root / split)
    # a short pretraining run gives an encoder.safetensors + encoder.json
    assert main(["pretrain", "--config", "configs/debug.yaml", "--debug", f"data.train_shards={out['train']}",
                 f"run.output_dir={root}", "run.name=pre", "optim.epochs=1", "data.steps_per_epoch=3",
                 "data.batch_size=16", "data.loader_workers=0", "method.queue_size=64"]) == 0
    out["encoder"] = str(root / "pre" / "encoder.safetensors")
    out["root"] = root
    return out


def ft_args(sets, name, *extra):
    return ["--config", "configs/debug.yaml", f"finetune.train_shards={sets['train']}",
            f"finetune.test_shards={sets['test']}", f"run.output_dir={sets['root']}", f"run.name={name}",
            "data.loader_workers=0", *extra]


def check_report(run_dir):
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 98 and m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    for key in ("mean_class_accuracy", "macro_f1", "per_class", "knn", "neighbours"):
        assert key in m
    assert m["neighbours"]["heatmap_k1"] > m["neighbours"]["chance"] + 0.3  # heatmap neighbours share expression
    for png in ("confusion_matrix.png", "neighbour_grid.png"):
        assert Image.open(os.path.join(run_dir, png)).size[0] > 100
    return m


@pytest.fixture(scope="module")
def linear_run(sets):
    assert main(["finetune", "--debug", *ft_args(sets, "linear", f"finetune.init={sets['encoder']}",
                                                  "finetune.epochs=5")]) == 0
    return os.path.join(sets["root"], "linear")


def test_linear_probe_from_a_pretraining_run(sets, linear_run):
    run_dir = linear_run
    m = check_report(run_dir)
    assert m["protocol"] == "linear" and m["encoder"] == {"arch": "resnet18", "width": 16, "stem": "imagenet"}
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5]
    assert os.path.exists(os.path.join(run_dir, "curves.png"))
    # the linear head was trained on the pretrained encoder: its weights are in the classifier
    from safetensors.torch import load_file

    enc = load_file(sets["encoder"])
    clf = load_file(os.path.join(run_dir, "classifier.safetensors"))
    assert torch.equal(clf["encoder.conv1.weight"], enc["conv1.weight"])
    # hncl evaluate on the saved classifier reproduces the accuracy
    assert main(["evaluate", *ft_args(sets, "eval", f"finetune.checkpoint={run_dir}")]) == 0
    again = json.load(open(os.path.join(sets["root"], "eval", "metrics.json")))
    assert again["accuracy"] == pytest.approx(m["accuracy"]) and again["knn"] == m["knn"]
    # both write their resolved config, as a pretraining run does: it loads back as it ran
    from hncl.config import load_config

    for folder, init in ((run_dir, sets["encoder"]), (os.path.join(sets["root"], "eval"), None)):
        saved = load_config(os.path.join(folder, "config.yaml"))
        assert saved.finetune.protocol.value == "linear" and saved.finetune.epochs == (5 if init else saved.finetune.epochs)
        assert saved.finetune.init == init or init is None


def test_full_finetune_from_a_torchvision_state_dict(sets):
    torch.manual_seed(0)
    path = os.path.join(sets["root"], "tv_resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert main(["finetune", "--debug", *ft_args(sets, "full", f"finetune.init={path}", "finetune.protocol=finetune",
                                                  "finetune.epochs=1", "finetune.batch_size=32", "model.width=64",
                                                  "model.stem=imagenet", "finetune.class_balanced=true")]) == 0
    m = check_report(os.path.join(sets["root"], "full"))
    assert m["protocol"] == "finetune" and m["encoder"]["width"] == 64
    assert len(m["history"]) == 1 and "train_loss" in m["history"][0]


def test_predict_reports_broken_files_and_non_faces_and_export_matches_pytorch(linear_run, tmp_path, capsys):
    run_dir = linear_run
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from hncl.data.synthetic import SyntheticFaces

    for i in range(3):
        Image.fromarray(SyntheticFaces(1, 3, seed=5)[i].image).save(imgs / f"face{i}.jpg")
    (imgs / "broken.jpg").write_bytes(b"not an image")
    assert main(["predict", str(imgs), "--checkpoint", run_dir, "--out", str(tmp_path / "p.json")]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "unreadable" in captured.err
    rows = json.load(open(tmp_path / "p.json"))
    assert [os.path.basename(r["file"]) for r in rows] == ["broken.jpg", "face0.jpg", "face1.jpg", "face2.jpg"]
    assert rows[0]["status"].startswith("unreadable") and rows[0]["expression"] is None
    assert all(r["status"] == "ok" and abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows[1:])
    # with --align dlib an image holding no face is said to hold none, never given an expression
    from photos import write_photos

    files = write_photos(str(tmp_path / "photos"))
    assert main(["predict", str(tmp_path / "photos"), "--checkpoint", run_dir, "--align", "dlib",
                 "--out", str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("file,status,expression,confidence,neutral") and lines[0].endswith(",note")
    by_name = {os.path.basename(line.split(",")[0])[:-4]: line.split(",") for line in lines[1:]}
    assert set(by_name) == set(files)
    for name, (_, faces) in files.items():
        status, expression, note = by_name[name][1], by_name[name][2], by_name[name][-1]
        if faces == 0:
            assert (status, expression) == ("no face detected", ""), name
        else:
            assert status == "ok" and expression in by_name[name] and expression != "", name
            assert note == ("several faces (kept the largest)" if faces > 1 else ""), name
    assert "not classified" in capsys.readouterr().err
    assert main(["export", "--checkpoint", run_dir, "--out", str(tmp_path / "export")]) == 0
    rep = json.load(open(tmp_path / "export" / "export.json"))
    assert rep["torchscript_max_abs_diff"] < 1e-4 and rep["onnx_max_abs_diff"] < 1e-4
    assert {"classifier.onnx", "classifier.torchscript.pt", "classifier.safetensors"} <= set(
        os.listdir(tmp_path / "export"))


def test_a_timm_vit_pretrains_resumes_exactly_and_probes(sets, tmp_path):
    """A timm backbone through the whole system: a run killed after its step-2 checkpoint resumes
    and trains steps 3-4 exactly as an uninterrupted run did (equal losses), its encoder (timm's
    key layout) is probed."""
    import subprocess
    import sys

    def pretrain(name, *extra):
        return ["pretrain", "--config", "configs/debug.yaml", "--debug", f"data.train_shards={sets['train']}",
                f"run.output_dir={tmp_path}", f"run.name={name}", "model.arch=timm/test_vit", "data.image_size=32",
                "optim.epochs=1", "data.steps_per_epoch=4", "optim.warmup_epochs=0", "data.batch_size=16",
                "data.loader_workers=0", "method.queue_size=64", "run.checkpoint_every=2", "run.log_every=1", *extra]

    def losses(name):
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]

    assert main(pretrain("straight")) == 0
    killed = subprocess.run([sys.executable, "-m", "hncl.cli", *pretrain("killed", "run.fail_at_step=3",
                                                                       "run.fail_rank=0")],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "fault injection: rank 0 exits at step 3" in killed.stdout
    assert main(pretrain("killed", "run.fail_at_step=3", "run.fail_rank=0")) == 0  # resumes from step 2
    assert losses("killed") == losses("straight") and len(losses("straight")) == 4

    encoder = str(tmp_path / "killed" / "encoder.safetensors")
    assert main(["finetune", "--debug", *ft_args(sets, "vit_probe", f"finetune.init={encoder}", "finetune.epochs=1",
                                                  "data.image_size=32", "finetune.knn_k=5")]) == 0
    probe = os.path.join(sets["root"], "vit_probe")
    assert json.load(open(os.path.join(probe, "classifier.json")))["arch"] == "timm/test_vit"
    # (predict and export of each family: tests/test_model.py)
