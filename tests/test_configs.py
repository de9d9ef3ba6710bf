"""Every shipped config runs: pretraining then a linear probe of its encoder, through the CLI a
user types (`hncl pretrain --config FILE --debug`, `hncl finetune ...`), with only size
overrides (a narrow network, small images, a few steps, one CPU process). What a config asks
for (strategy, ZeRO stage, optimiser, precision, augmentation placement) is kept and checked
in the run's resolved config."""

import glob
import json
import os
import subprocess
import sys

import pytest

from hncl.config import load_config
from hncl.data.make_shards import ShardJob, make_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
SIZE = {  # sizes only: what the config says about method, strategy and precision stays
    "model.width": 8, "model.proj_hidden": 32, "model.proj_out": 16, "model.pred_hidden": 32,
    "data.image_size": 32, "data.batch_size": 8, "data.loader_workers": 0, "data.shuffle_buffer": 16,
    "data.steps_per_epoch": 2, "optim.epochs": 2, "optim.warmup_epochs": 1, "method.queue_size": 64,
    "dist.num_workers": 1, "dist.use_gpu": False, "dist.cpus_per_worker": 1, "run.log_every": 1,
    "run.checkpoint_every": 2, "finetune.epochs": 2, "finetune.batch_size": 32,
}


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("configs") / "synth"
    job = ShardJob(source="synthetic", out=str(out), source_options=(("num_samples", 64), ("seed", 3), ("size", 64)),
                   image_size=64)
    make_shards(job, shard_size=16, descriptor_dim=16, progress=False, log=lambda *_: None)
    return str(out)


def test_every_config_file_is_covered():
    assert {"configs/debug.yaml", "configs/demo.yaml", "configs/pretrain_r18.yaml",
            "configs/pretrain_r50_deepspeed.yaml", "configs/pretrain_vit_s.yaml", "configs/pretrain_convnext_t.yaml",
            "configs/pretrain_ir50.yaml"} <= set(CONFIGS)


def _hncl(*commands, cwd):
    """The commands run one after the other as `hncl ...` would run them, in one fresh process
    (one interpreter start for the lot), stopping at the first that fails."""
    script = ("import sys\nfrom hncl.cli import main\n"
              f"for args in {list(commands)!r}:\n    code = main(args)\n    if code: sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, (commands, (run.stdout + run.stderr)[-4000:])
    return run


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_pretrains_and_probes_on_cpu(config, labelled_set, tmp_path):
    size = [f"{k}={v}" for k, v in SIZE.items()]
    name = os.path.basename(config)[:-5]
    run_dir = tmp_path / name
    # pretraining, then the pretrained encoder fine-tuned with the same config file (its protocol)
    _hncl(["pretrain", "--config", os.path.join(REPO, config), "--debug", f"data.train_shards={labelled_set}",
           f"run.output_dir={tmp_path}", f"run.name={name}", *size],
          ["finetune", "--config", os.path.join(REPO, config), "--debug", f"finetune.train_shards={labelled_set}",
           f"finetune.test_shards={labelled_set}", f"finetune.init={run_dir / 'encoder.safetensors'}",
           f"run.output_dir={tmp_path}", f"run.name={name}-probe", *size], cwd=tmp_path)
    shipped, used = load_config(os.path.join(REPO, config)), load_config(str(run_dir / "config.yaml"))
    for key in ("model.arch", "method.name", "method.batch_neighbours", "method.queue_dtype", "dist.strategy",
                "dist.zero_stage", "dist.precision", "optim.name", "optim.grad_clip", "data.augment_on",
                "optim.layer_decay", "finetune.protocol", "finetune.layer_decay"):
        section, field = key.split(".")
        assert used[section][field] == shipped[section][field], key
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in rows)
    state = json.loads((run_dir / "checkpoint_00000004" / "train_state.json").read_text())
    assert state["strategy"] == shipped.dist.strategy.value and state["step"] == 4
    metrics = json.loads((tmp_path / f"{name}-probe" / "metrics.json").read_text())
    assert metrics["encoder"]["width"] == 8 and sum(map(sum, metrics["confusion_matrix"])) == 64
