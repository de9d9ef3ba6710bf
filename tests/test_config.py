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


# Every field with an obvious range, and every value derived from others (issue #22): each bad
# setting is one line naming the field. (overrides on configs/debug.yaml, the field the line names)
BAD_SETTINGS = [
    (["data.steps_per_epoch=-5"], "data.steps_per_epoch"),
    (["run.name=../../escaped"], "run.name"),
    (["run.name=a/b"], "run.name"),
    (["run.name=.."], "run.name"),
    (["run.name=/abs"], "run.name"),
    (["run.name=a\\b"], "run.name"),
    (["run.output_dir=''"], "run.output_dir"),
    (["optim.warmup_epochs=-3"], "optim.warmup_epochs"),
    (["optim.warmup_epochs=3", "optim.epochs=2"], "optim.warmup_epochs"),
    (["optim.momentum=7"], "optim.momentum"),
    (["optim.momentum=1"], "optim.momentum"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim.grad_clip=0"], "optim.grad_clip"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["optim.layer_decay=1.5", "model.arch=timm/test_vit"], "optim.layer_decay"),
    (["optim.layer_decay=0.75"], "optim.layer_decay"),  # resnet18: no timm layer groups
    (["finetune.layer_decay=0.65", "model.arch=timm/test_vit", "finetune.protocol=linear"], "finetune.layer_decay"),
    (["model.arch=timm/vit_smal_patch16_224"], "model.arch"),
    (["optim.lr=inf"], "optim.lr"),
    (["data.shuffle_buffer=-5"], "data.shuffle_buffer"),
    (["data.stall_timeout_s=.inf"], "data.stall_timeout_s"),
    (["dist.cpus_per_worker=0"], "dist.cpus_per_worker"),
    (["dist.max_failures=-1"], "dist.max_failures"),
    (["dist.node_wait_s=inf"], "dist.node_wait_s"),
    (["finetune.batch_size=0"], "finetune.batch_size"),
    (["finetune.encoder_lr_scale=-0.1"], "finetune.encoder_lr_scale"),
    (["finetune.weight_decay=-1"], "finetune.weight_decay"),
    (["finetune.label_smoothing=1"], "finetune.label_smoothing"),
    (["finetune.label_smoothing=-0.1"], "finetune.label_smoothing"),
    (["finetune.knn_temperature=0"], "finetune.knn_temperature"),
    (["run.seed=-1"], "run.seed"),
    (["run.fail_rank=-1"], "run.fail_rank"),
    (["run.fail_at_step=0"], "run.fail_at_step"),
    (["run.fail_at_step=5", "run.fail_rank=1"], "run.fail_rank"),  # one rank: the fault would never fire
    (["method.nn_weight=-1"], "method.nn_weight"),
    (["method.batch_neighbours=0", "method.exclude_neighbours=true"], "method.exclude_neighbours"),
    (["method.batch_neighbours=0", "method.mutual_neighbours=true"], "method.mutual_neighbours"),
    (["method.batch_neighbours=0", "method.batch_pool=any"], "method.batch_pool"),
    (["method.batch_neighbours=5", "method.batch_weight_temperature=-0.1"], "method.batch_weight_temperature"),
    (["method.batch_neighbours=5", "method.batch_weight_temperature=1e-39"], "method.batch_weight_temperature"),
    (["method.batch_neighbours=0", "method.batch_weight_temperature=0.05"], "method.batch_weight_temperature"),
    (["descriptor.dim=0"], "descriptor.dim"),
    (["descriptor.whiten=-1"], "descriptor.whiten"),
    (["descriptor.dim=8", "descriptor.whiten=9"], "descriptor.whiten"),  # more than the descriptor has
    # derived values that used to be cut silently: now refused
    (["method.batch_neighbours=500"], "method.batch_neighbours"),  # global batch 32
    (["method.batch_neighbours=64", "dist.num_workers=2"], "method.batch_neighbours"),  # = 2 x 32
    (["method.batch_neighbours=8", "data.global_batch_size=8"], "method.batch_neighbours"),
    (["method.topk=5000"], "method.topk"),  # queue 1024
    (["data.global_batch_size=30", "dist.num_workers=4"], "data.global_batch_size"),
]


def test_each_method_owns_its_options():
    """The method section is the chosen method's Config: its own options with their defaults, no
    other method's; an option of another method is refused naming whose it is (a config written
    for that method), a misspelt one with the keys this method has."""
    assert set(load_config(None, ["method.name=simclr"]).method) == {"name", "temperature"}
    nnclr = load_config(None, ["method.name=nnclr", "method.topk=3"]).method
    assert set(nnclr) == {"name", "temperature", "topk", "queue_size", "queue_dtype"} and nnclr.topk == 3
    assert load_config(None).method.batch_neighbours == 0  # hncl's defaults, from its own Config
    # the last source that names the method picks the schema: the file's hncl options, then simclr on the command line
    with pytest.raises(ConfigError, match=r"^config error: method.topk is an option of nnclr and hncl, not of "
                                          r"method.name=simclr \(its options: name, temperature\): remove it, or set "
                                          r"method.name=nnclr \[configs/debug.yaml\]$"):
        load_config("configs/debug.yaml", ["method.name=simclr"])
    with pytest.raises(ConfigError, match=r"unknown key 'method.batch_neighbour' \(did you mean 'method.batch_neighbours'\?\); "
                                          r"keys allowed in 'method' for method.name=hncl: name, temperature, topk"):
        load_config(None, ["method.batch_neighbour=5"])
    with pytest.raises(ConfigError, match=r"method.exclude_neighbours is an option of hncl, not of method.name=nnclr"):
        load_config(None, ["method.exclude_neighbours=true", "method.name=nnclr"])
    # what a worker gets (plain data) types back to the same config, for every method
    from hncl.config import typed
    from hncl.core.methods import METHODS
    from hncl.train.launch import worker_config

    for name in METHODS:
        cfg = load_config(None, [f"method.name={name}", "method.temperature=0.3"])
        again = typed(worker_config(cfg, "local")["cfg"])
        assert again == cfg and OmegaConf.get_type(again.method) is OmegaConf.get_type(cfg.method)


@pytest.mark.parametrize("overrides, field", BAD_SETTINGS)
def test_every_bad_setting_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("configs/debug.yaml", overrides)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"config error: {field}="), msg


def test_the_queue_is_split_over_torchruns_world_size_not_dist_num_workers(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"^config error: method\.queue_size=1024: .*3 ranks \(torchrun's "):
        load_config("configs/debug.yaml", ["dist.num_workers=2"])
    with pytest.raises(ConfigError, match=r"^config error: method\.batch_neighbours=5: .*global batch of 3 samples"):
        load_config("configs/debug.yaml", ["data.batch_size=1", "method.queue_size=3"])
    assert load_config("configs/debug.yaml", ["method.queue_size=1023"]).method.queue_size == 1023


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from hncl.data.make_shards import ShardJob, make_shards

    out = tmp_path_factory.mktemp("cfg") / "set"
    job = ShardJob(source="synthetic", out=str(out), source_options=(("num_samples", 16), ("seed", 0), ("size", 32)),
                   image_size=32)
    make_shards(job, shard_size=8, descriptor_dim=8, progress=False, log=lambda *_: None)
    return str(out)


@pytest.mark.parametrize("overrides, field", [
    (["descriptor.dim=999"], "descriptor.dim"),  # used to be replaced by the set's 8
    (["descriptor.resolution=8"], "descriptor.resolution"),
    (["descriptor.inner_only=false"], "descriptor.inner_only"),
    (["descriptor.whiten=9"], "descriptor.whiten"),  # the set's descriptor has 8 components
    # --debug is one process: a global batch of 4, not the 8 of two Ray workers
    (["dist.num_workers=2", "method.batch_neighbours=5"], "method.batch_neighbours"),
    # images the encoder cannot take: a ViT would drop the pixels past its last whole patch
    (["model.arch=timm/test_vit", "data.image_size=40"], "data.image_size"),  # test_vit: 16 px patches
    (["model.arch=iresnet18", "model.width=8", "data.image_size=40"], "data.image_size"),  # 4 stride-2 stages
    (["model.arch=timm/test_convnext", "data.image_size=16"], "data.image_size"),  # nothing left after its strides
])
def test_settings_the_shard_set_or_the_real_ranks_cannot_honour_are_refused(tiny_set, overrides, field):
    from hncl.infra import preflight

    cfg = load_config("configs/debug.yaml", [f"data.train_shards={tiny_set}", "data.batch_size=4",
                                             "method.batch_neighbours=3", *overrides])
    with pytest.raises(ConfigError) as err:
        preflight.pretrain(cfg, debug=True)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"config error: {field}="), str(err.value)


def test_the_shard_sets_descriptor_is_used_when_the_config_leaves_it_unset(tiny_set):
    from hncl.infra import preflight

    cfg = load_config("configs/debug.yaml", [f"data.train_shards={tiny_set}", "data.batch_size=8"])
    assert cfg.descriptor.dim is None
    preflight.pretrain(cfg, debug=True)
    preflight.pretrain(load_config("configs/debug.yaml", [f"data.train_shards={tiny_set}", "descriptor.dim=8"]),
                       debug=True)
    with pytest.raises(ConfigError, match=r"^config error: finetune\.knn_k=20: must be <= the 16 samples"):
        preflight.finetune(load_config("configs/debug.yaml", [f"finetune.train_shards={tiny_set}",
                                                              f"finetune.test_shards={tiny_set}"]))


@pytest.mark.parametrize("overrides, env, starts", [
    (["run.name=../../escaped"], {}, "config error: run.name="),
    (["method.topk=2000"], {}, "config error: method.topk="),
    (["dist.max_failures=-1"], {}, "config error: dist.max_failures="),
    ([], {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
     "config error: method.queue_size="),
    (["descriptor.dim=999"], {}, "config error: descriptor.dim="),
    (["run.output_dir=a_file"], {}, "config error: run.output_dir="),
    (["model.init_weights=a_file"], {}, "error: model.init_weights: cannot read weights"),
])
def test_cli_refuses_a_bad_setting_in_one_line_and_writes_nothing(overrides, env, starts, tiny_set, tmp_path):
    """`hncl pretrain` exits 1 with one line naming the field, before any run directory exists."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "runs" / "here"
    (tmp_path / "a_file").write_text("not a folder, nor weights")
    before = sorted(p for p in tmp_path.rglob("*"))
    config = os.path.join(root, "configs", "debug.yaml")
    run = subprocess.run([sys.executable, "-m", "hncl.cli", "pretrain", "--config", config, "--debug",
                          f"data.train_shards={tiny_set}", f"run.output_dir={out}", *overrides],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TORCHELASTIC"))},
                              **env})
    assert run.returncode == 1, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hncl pretrain: {starts}"), lines
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no run directory, nothing escaped
    assert not os.path.exists(tmp_path.parent / "escaped") and not (tmp_path / "escaped").exists()


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


@pytest.mark.parametrize("args, words", [
    (["make-shards", "--num-samples", "-3"], "--num-samples must be >= 1"),
    (["make-shards", "--num-samples", "0"], "--num-samples must be >= 1"),  # was the default 1000
    (["make-shards", "--descriptor-dim", "0"], "--descriptor-dim must be >= 1"),
    (["make-shards", "--workers", "0"], "--workers must be >= 1"),
    (["make-shards", "--max-skip-fraction", "2"], "--max-skip-fraction must be in [0, 1]"),
    (["make-shards", "--readers", "0"], "--readers must be >= 1"),
    (["make-shards", "--seed", "-1"], "--seed must be >= 0"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--identities", "0", "3"], "--identities must be >= 1"),
    (["demo", "--seeds", "5-2"], "--seeds 5-2"),
    (["make-shards", "--source", "folder", "--input", ".", "--difficulty", "realistic"], "--difficulty is for --source synthetic"),
])
def test_command_flags_out_of_range_are_one_line_and_write_nothing(args, words, tmp_path, capsys):
    from hncl.cli import main

    out = tmp_path / "out"
    assert main([*args, "--out", str(out), *(["--quiet"] if args[0] == "make-shards" else [])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
