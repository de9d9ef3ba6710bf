"""Config loading, overrides, validation, and the CLI surface."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from hncl.cli import main
from hncl.config import ConfigError, NNSpace, load_config, save_config

CONFIGS = ["configs/debug.yaml", "configs/pretrain_r18.yaml"]


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 48\nmethod:\n  topk: 3\n")
    cfg = load_config(str(path), ["method.topk=5", "method.nn_space=embedding"])
    assert cfg.data.batch_size == 48  # from the file
    assert cfg.method.topk == 5  # override beats file
    assert cfg.method.nn_space == NNSpace.embedding
    assert cfg.method.temperature == 0.1  # default untouched


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.method.queue_size % cfg.dist.num_workers == 0


@pytest.mark.parametrize("overrides, must_contain", [
    (["data.batchsize=3"], ["unknown key 'data.batchsize'", "did you mean 'data.batch_size'", "image_size"]),
    (["nope=1"], ["unknown key 'nope'", "method"]),
    (["method.nn_space=pixels"], ["method.nn_space", "heatmap, embedding, none"]),
    (["data.batch_size=lots"], ["data.batch_size", "lots"]),
    (["method.topk=0"], ["method.topk=0", ">= 1"]),
    (["method.queue_size=1000", "dist.num_workers=3"], ["method.queue_size=1000", "divisible"]),
    (["method.temperature=-1"], ["method.temperature"]),
    (["method.batch_neighbours=-1"], ["method.batch_neighbours=-1", ">= 0"]),
    (["descriptor.resolution=10"], ["descriptor.resolution", "16"]),
    (["justtext"], ["justtext", "key=value"]),
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
