"""Config loading, overrides, validation, and the CLI surface."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from hncl.cli import main
from hncl.config import ConfigError, load_config, save_config

CONFIGS = ["configs/debug.yaml", "configs/pretrain_r18.yaml"]


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 48\nmethod:\n  topk: 3\n")
    cfg = load_config(str(path), ["method.topk=5", "method.name=nnclr"])
    assert cfg.data.batch_size == 48  # from the file
    assert cfg.method.topk == 5  # override beats file
    assert cfg.method.name == "nnclr"
    assert cfg.method.temperature == 0.1  # default untouched


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.method.queue_size % cfg.dist.num_workers == 0


@pytest.mark.parametrize("overrides, must_contain", [
    (["data.batchsize=3"], ["unknown key 'data.batchsize'", "did you mean 'data.batch_size'", "image_size"]),
    (["nope=1"], ["unknown key 'nope'", "method"]),
    (["method.name=pixels"], ["method.name", "simclr, nnclr, hncl, supervised"]),
    (["dist.strategy=horovod"], ["dist.strategy", "ddp, deepspeed"]),
    (["data.batch_size=lots"], ["data.batch_size", "lots"]),
    (["method.topk=0"], ["method.topk=0", ">= 1"]),
    (["method.queue_size=1000", "dist.num_workers=3"], ["method.queue_size=1000", "divisible"]),
    (["method.temperature=-1"], ["method.temperature"]),
    (["method.batch_neighbours=-1"], ["method.batch_neighbours=-1", ">= 0"]),
    (["descriptor.resolution=10"], ["descriptor.resolution", "16"]),
    (["justtext"], ["justtext", "key=value"]),
    (["run.reshard_queue=true"], ["run.reshard_queue was removed", "re-splits the queue"]),
    (["data.global_batch_size=0"], ["data.global_batch_size=0", ">= 1"]),
    (["data.steps_per_epoch=0"], ["data.steps_per_epoch=0", ">= 1"]),
])
def test_bad_config_names_the_field(overrides, must_contain):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg


def test_bad_key_in_yaml_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  lambda: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'method.lambda'.*bad.yaml"):
        load_config(str(path))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config("configs/debug.yaml", ["method.topk=4"])
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_cli_config_prints_and_bad_key_is_one_line(capsys):
    assert main(["config", "--config", "configs/debug.yaml", "data.batch_size=7"]) == 0
    assert "batch_size: 7" in capsys.readouterr().out
    assert main(["config", "data.batchsize=7"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.batchsize" in err


SUBCOMMANDS = ["config", "make-shards", "pretrain", "finetune", "evaluate", "predict", "export", "demo"]


def test_console_script_help_for_every_subcommand():
    exe = [sys.executable, "-m", "hncl.cli"]
    top = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
        sub = subprocess.run(exe + [name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and f"hncl {name}" in sub.stdout, name


def test_make_shards_preview_writes_a_contact_sheet(tmp_path):
    from PIL import Image

    out = tmp_path / "preview.png"
    assert main(["make-shards", "--source", "synthetic", "--num-samples", "10", "--preview", str(out)]) == 0
    assert Image.open(out).size == (8 * 112, 2 * (112 + 14))
    assert main(["make-shards", "--source", "synthetic"]) == 2  # no --out: refused with a message


@pytest.mark.parametrize("overrides, must_contain", [
    (["method.nn_weight=0"], ["method.nn_weight", "method.name=simclr"]),
    (["dist.precision=float64"], ["dist.precision", "float32, bfloat16, float16"]),
    (["model.sync_bn=true", "dist.strategy=deepspeed"], ["model.sync_bn", "dist.strategy=ddp"]),
])
def test_combinations_that_cannot_run_are_refused_naming_the_fields(overrides, must_contain):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value) and all(part in str(err.value) for part in must_contain)


def test_local_paths_are_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train_shards=shards/x", "finetune.init=none", "finetune.test_shards=s3://b/t",
                             "model.init_weights=~/w.pth", "finetune.checkpoint=../probe"])
    assert cfg.data.train_shards == str(tmp_path / "shards" / "x")
    assert cfg.run.output_dir == str(tmp_path / "runs")  # the default, too
    assert cfg.finetune.init == "none" and cfg.finetune.test_shards == "s3://b/t"
    assert cfg.model.init_weights == os.path.expanduser("~/w.pth")
    assert cfg.finetune.checkpoint == str(tmp_path.parent / "probe")
    assert cfg.finetune.train_shards is None


def test_a_relative_output_dir_is_refused_inside_a_ray_job_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}')
    with pytest.raises(ConfigError, match=r"run.output_dir=runs is a relative path.*ray job submit.*s3://"):
        load_config(None, [])
    cfg = load_config(None, ["run.output_dir=s3://bucket/runs", "data.train_shards=shards/x"])
    assert cfg.data.train_shards == str(tmp_path / "shards" / "x")  # inputs: the uploaded copy
    assert load_config(None, [f"run.output_dir={tmp_path}/r"]).run.output_dir == f"{tmp_path}/r"


@pytest.mark.parametrize("argv, must_contain", [
    (["pretrain", "--config", "configs/debug.yaml", "data.train_shards=nope/set"],
     "data.train_shards: {cwd}/nope/set is not a finished shard set"),
    (["pretrain", "--config", "configs/debug.yaml", "--debug"], "data.train_shards is not set"),
    (["finetune", "--debug", "finetune.train_shards=nope/a", "finetune.test_shards=nope/b"],
     "finetune.train_shards: {cwd}/nope/a is not a finished shard set"),
    (["evaluate", "finetune.train_shards=a", "finetune.test_shards=b"], "finetune.checkpoint is not set"),
    (["predict", "photos/", "--checkpoint", "runs/probe"], "no classifier at runs/probe"),
    (["export", "--checkpoint", "runs/probe", "--out", "x"], "no classifier at runs/probe"),
    (["make-shards", "--source", "folder", "--input", "nope", "--out", "x"], "nope is not a directory"),
])
def test_every_cli_error_a_user_can_cause_is_one_line_and_exit_1(argv, must_contain, tmp_path, monkeypatch):
    """Missing inputs are found in the driver, before Ray starts (pretrain without --debug
    here would otherwise start Ray and print a traceback per worker and retry)."""
    for path in ("configs",):
        os.symlink(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path),
                   tmp_path / path)
    monkeypatch.chdir(tmp_path)
    run = subprocess.run([sys.executable, "-m", "hncl.cli", *argv], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    assert run.returncode == 1, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hncl {argv[0]}: ") and must_contain.format(cwd=tmp_path) in lines[0], lines
    assert "Traceback" not in run.stderr and "ray" not in run.stderr.lower()
