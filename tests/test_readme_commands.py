"""The README's quick-start commands, run as a user runs them: the bash block under
"## Quick start", line by line and in order, from a fresh working directory holding what a
checkout holds (configs/, cluster/), with relative paths and default output folders, real Ray
(while another Ray cluster runs on the machine, and RAY_ADDRESS unset), tiny only where the
README's own sizes would take minutes (the demo, see SIZE).

When the README's block changes, this test runs the new block; COMMANDS says what each command
must have left behind, and the test fails if a command has no check or a check no command.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from hncl.data.synthetic import EXPRESSIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# appended to a command (size flags only): the quick demo as written takes ~3 minutes
SIZE = {"hncl demo --quick": "--steps 4 --identities 8 4"}


def readme_block(title: str = "## Quick start") -> list:
    """The commands of the first ```bash block after `title` (continuations joined, comments dropped)."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index(title):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        line = line.split("  #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not line.strip() and not current:
            continue
        current += line.strip() + " "
        if not line.endswith("\\"):
            commands.append(current.replace("\\ ", "").strip())
            current = ""
    return commands


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def check_make_shards(cwd, out, cmd):
    target = re.search(r"--out (\S+)", cmd).group(1)
    n = int(re.search(r"--num-samples (\d+)", cmd).group(1))
    assert json.load(open(os.path.join(cwd, target, "manifest.json")))["num_samples"] == n


def check_pretrain_debug(cwd, out, cmd):
    run = os.path.join(cwd, "runs", "debug")
    assert [m["step"] for m in _metrics(os.path.join(run, "metrics.jsonl"))][-1] == 40
    assert os.path.exists(os.path.join(run, "encoder.safetensors"))


def check_torchrun(cwd, out, cmd):
    ckpt = os.path.join(cwd, "runs", "debug-torchrun", "checkpoint_00000040")
    assert {"queue_rank0.pt", "queue_rank1.pt", "_COMPLETE"} <= set(os.listdir(ckpt))


def check_pretrain_ray(cwd, out, cmd):
    # every file of the run in ./runs (Train runs its workers elsewhere), each worker line once
    run = os.path.join(cwd, "runs", "debug-ray")
    assert {"config.yaml", "metrics.jsonl", "encoder.safetensors", "checkpoint_00000040"} <= set(os.listdir(run))
    assert "private local Ray instance" in out
    assert out.count("[hncl] finished 40 steps") == 1 and out.count("[hncl] step 40 ") == 1
    assert "Failed to query Ray Train Controller" not in out


def check_finetune(cwd, out, cmd):
    m = json.load(open(os.path.join(cwd, "runs", "probe", "metrics.json")))
    assert m["init"] == os.path.join(cwd, "runs", "debug", "encoder.safetensors") and 0 <= m["accuracy"] <= 1


def check_evaluate(cwd, out, cmd):
    own = json.load(open(os.path.join(cwd, "runs", "probe-eval", "metrics.json")))
    probe = json.load(open(os.path.join(cwd, "runs", "probe", "metrics.json")))
    assert own["accuracy"] == pytest.approx(probe["accuracy"])  # the same classifier on the same faces
    assert not os.path.exists(os.path.join(cwd, "runs", "debug", "metrics.json"))  # not into the pretraining run


def check_predict(cwd, out, cmd):
    from photos import photos

    rows = open(os.path.join(cwd, "predictions.csv")).read().splitlines()[1:]
    status = {os.path.basename(r.split(",")[0])[:-4]: r.split(",")[1] for r in rows}
    assert status == {n: ("ok" if faces else "no face detected") for n, (_, faces) in photos().items()}


def check_export(cwd, out, cmd):
    rep = json.load(open(os.path.join(cwd, "exported", "export.json")))
    assert rep["onnx_max_abs_diff"] < 1e-4


def check_demo(cwd, out, cmd):
    report = json.load(open(os.path.join(cwd, "demo_out", "report.json")))
    assert set(report) == {"hncl", "baseline", "nnclr", "random-init", "_run"}
    for row in ("hncl", "baseline", "nnclr", "random-init"):  # every row with the per-class accuracies
        assert set(report[row]["per_class_acc"]) == set(EXPRESSIONS)
    assert "private local Ray instance" in out and "Failed to query Ray Train Controller" not in out
    assert "Reporting training result" not in out and "[hncl] step" in out  # our progress lines, not Ray's


COMMANDS = [  # (how the README line starts, what it must leave behind)
    ("hncl make-shards", check_make_shards),
    ("hncl pretrain --config configs/debug.yaml --debug", check_pretrain_debug),
    ("torchrun --nproc_per_node 2 -m hncl.cli pretrain", check_torchrun),
    ("hncl pretrain --config configs/debug.yaml data.", check_pretrain_ray),
    ("hncl finetune", check_finetune),
    ("hncl evaluate", check_evaluate),
    ("hncl predict", check_predict),
    ("hncl export", check_export),
    ("hncl demo --quick", check_demo),
]


def test_readme_quick_start_has_a_check_for_every_command():
    commands = readme_block()
    for cmd in commands:
        assert any(cmd.startswith(prefix) for prefix, _ in COMMANDS), f"no check for README command: {cmd}"
    for prefix, _ in COMMANDS:
        assert any(cmd.startswith(prefix) for cmd in commands), f"README no longer has: {prefix}"


@pytest.mark.slow
def test_readme_quick_start_runs_top_to_bottom_as_written(tmp_path, ray_local):
    """ray_local: a user's cluster started with `ray start` is running; the commands must not
    join it (no RAY_ADDRESS), but start their own."""
    from photos import write_photos

    cwd = tmp_path / "checkout"
    for folder in ("configs", "cluster"):
        shutil.copytree(os.path.join(REPO, folder), cwd / folder)
    write_photos(str(cwd / "photos"))  # the user's own photos for `hncl predict photos/`
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1")
    for cmd in readme_block():
        run = cmd + "".join(f" {extra}" for prefix, extra in SIZE.items() if cmd.startswith(prefix))
        result = subprocess.run(["bash", "-c", run], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=900)
        out = result.stdout + result.stderr
        assert result.returncode == 0, f"{run}\n{out[-4000:]}"
        check = next(check for prefix, check in COMMANDS if cmd.startswith(prefix))
        check(str(cwd), out, cmd)
