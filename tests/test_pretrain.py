"""Pretraining end to end: debug mode, Ray Train with DDP and DeepSpeed, a killed worker, S3,
`ray job submit` and NaN handling (resuming: tests/test_resume.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hncl.config import load_config
from hncl.core.model import ResNetEncoder, load_encoder_weights
from hncl.core.queue import state_digest
from hncl.data.make_shards import ShardJob, make_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "synthetic"
    job = ShardJob(source="synthetic", out=str(out), source_options=(("num_samples", 240), ("seed", 0), ("size", 112)))
    make_shards(job, shard_size=30, descriptor_dim=32, progress=False, log=lambda *_: None)
    return str(out)


def overrides(shards, out, name, steps=8, **extra):
    o = {"data.train_shards": shards, "run.output_dir": str(out), "run.name": name, "optim.epochs": 1,
         "data.steps_per_epoch": steps, "data.batch_size": 16, "data.loader_workers": 1, "run.log_every": 2,
         "run.checkpoint_every": 4, "run.keep_checkpoints": 10, "method.queue_size": 256, **extra}
    return [f"{k}={v}" for k, v in o.items()]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def queue_digests(checkpoint, world):
    return [state_digest(torch.load(os.path.join(checkpoint, f"queue_rank{r}.pt"), weights_only=True))
            for r in range(world)]


def check_encoder(run_dir):
    enc = ResNetEncoder("resnet18", width=16, stem="imagenet")
    load_encoder_weights(enc, os.path.join(run_dir, "encoder.safetensors"))
    assert json.load(open(os.path.join(run_dir, "encoder.json")))["out_dim"] == enc.out_dim


def test_debug_mode_runs_in_process_without_ray_and_resumes(shard_set, tmp_path):
    args = overrides(shard_set, tmp_path, "debug")
    code = ("import sys; from hncl.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'debug mode imported Ray'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "pretrain", "--config", "configs/debug.yaml", "--debug", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = str(tmp_path / "debug")
    assert f"run directory: {run_dir}" in run.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [2, 4, 6, 8]
    assert load_config(os.path.join(run_dir, "config.yaml")).data.train_shards == shard_set
    for step in (4, 8):
        names = os.listdir(os.path.join(run_dir, f"checkpoint_{step:08d}"))
        assert {"queue_rank0.pt", "model.safetensors", "optimizer.pt", "train_state.json", "_COMPLETE"} <= set(names)
    check_encoder(run_dir)
    # an earlier attempt got further, then failed while uploading checkpoint 12: its TensorBoard
    # events for steps 10-12 and the incomplete folder are what a failed run leaves behind
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    abandoned = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    for step in (10, 12):
        abandoned.add_scalar("loss", 1e6, step)
    abandoned.close()
    shutil.copytree(os.path.join(run_dir, "checkpoint_00000008"), os.path.join(run_dir, "checkpoint_00000012"))
    os.remove(os.path.join(run_dir, "checkpoint_00000012", "_COMPLETE"))
    open(os.path.join(run_dir, "checkpoint_00000012", "from_the_failed_attempt"), "w").close()
    # the same command with a longer schedule resumes from step 8 with the queue restored exactly
    more = [a for a in args if not a.startswith("optim.epochs")] + ["optim.epochs=2"]
    run = subprocess.run([sys.executable, "-m", "hncl.cli", "pretrain", "--config", "configs/debug.yaml", "--debug",
                          *more], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed at step 8" in run.stdout
    (resume,) = [json.loads(l) for l in open(os.path.join(run_dir, "resumes.jsonl"))]
    assert resume["step"] == 8
    assert resume["queue_digests"] == queue_digests(os.path.join(run_dir, "checkpoint_00000008"), 1)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(2, 17, 2))
    # the abandoned folder was removed on resume (step 12 was then saved anew, complete)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint_00000012", "from_the_failed_attempt"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == list(range(2, 17, 2)) and max(e.value for e in events.Scalars("loss")) < 1e6


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(shard_set, tmp_path, monkeypatch):
    from hncl.core.methods.hncl import HNCL
    from hncl.train.launch import pretrain
    from hncl.train.loop import NonFiniteLossError

    real = HNCL.training_step
    calls = {"n": 0}

    def poisoned(self, batch):
        loss, metrics = real(self, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            return loss * float("nan"), {**metrics, "loss": float("nan")}
        return loss, metrics

    monkeypatch.setattr(HNCL, "training_step", poisoned)
    # also the GPU-job settings on CPU: views made per batch in the loop, in-batch neighbours
    cfg = load_config("configs/debug.yaml", overrides(shard_set, tmp_path, "nan", **{
        "run.checkpoint_every": 2, "data.loader_workers": 0, "data.augment_on": "device",
        "method.batch_neighbours": 3}))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3.*last good checkpoint"):
        pretrain(cfg, debug=True)
    good = tmp_path / "nan" / "checkpoint_00000002"
    assert (good / "_COMPLETE").exists() and not (tmp_path / "nan" / "checkpoint_00000003").exists()
    state = json.loads((good / "train_state.json").read_text())
    assert state["step"] == 2
    (row,) = read_metrics(str(tmp_path / "nan"))
    assert row["step"] == 2 and 0.0 <= row["batch_nn_purity"] <= 1.0 and row["loss_batch_nn"] > 0


def test_a_whitened_descriptor_run_searches_whitened_keys_and_resumes_only_with_them(shard_set, tmp_path):
    from hncl.errors import UserError
    from hncl.train.launch import pretrain

    args = overrides(shard_set, tmp_path, "white", steps=4, **{"data.loader_workers": 0, "descriptor.whiten": 8})
    pretrain(load_config("configs/debug.yaml", args), debug=True)
    queue = torch.load(tmp_path / "white" / "checkpoint_00000004" / "queue_rank0.pt", weights_only=True)
    # the set's descriptor has 32 components: keys of 8 are its whitened first 8
    assert queue["keys"].shape[1] == 8 and queue["key_space"] == "descriptor.whiten=8"
    assert torch.allclose(queue["keys"].norm(dim=1)[queue["ids"] >= 0], torch.ones(1))
    longer = [a for a in args if not a.startswith("optim.epochs")] + ["optim.epochs=2"]
    for other in ("descriptor.whiten=0", "descriptor.whiten=4"):  # another space, or another size
        with pytest.raises(UserError, match=r"cannot resume from .*checkpoint_00000004: queue checkpoint"):
            pretrain(load_config("configs/debug.yaml", [*longer, other]), debug=True)
    pretrain(load_config("configs/debug.yaml", longer), debug=True)  # the same setting resumes
    assert [m["step"] for m in read_metrics(str(tmp_path / "white"))] == [2, 4, 6, 8]


def test_ray_ddp_two_workers_survive_a_killed_worker(shard_set, tmp_path, ray_local):
    from hncl.train.launch import pretrain

    cfg = load_config("configs/debug.yaml", overrides(shard_set, tmp_path, "ddp", steps=16, **{
        "dist.num_workers": 2, "dist.max_failures": 1, "run.fail_at_step": 11, "run.fail_rank": 1}))
    pretrain(cfg)
    run_dir = str(tmp_path / "ddp")
    assert (tmp_path / "ddp" / ".fault_injected").exists()  # rank 1 really died at step 11
    (resume,) = [json.loads(l) for l in open(os.path.join(run_dir, "resumes.jsonl"))]
    # Ray restarts from the newest checkpoint its controller had registered (it polls reports)
    assert resume["step"] in (4, 8) and resume["world_size"] == 2
    # both ranks' queue slices came back exactly as checkpointed
    assert resume["queue_digests"] == queue_digests(os.path.join(run_dir, f"checkpoint_{resume['step']:08d}"), 2)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(2, 17, 2))  # no duplicates from the lost steps
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    for step in (4, 8, 12, 16):
        names = set(os.listdir(os.path.join(run_dir, f"checkpoint_{step:08d}")))
        assert {"queue_rank0.pt", "queue_rank1.pt", "model.safetensors", "optimizer.pt"} <= names
    assert os.path.exists(os.path.join(run_dir, "config.yaml")) and os.path.exists(os.path.join(run_dir, "metrics.csv"))
    check_encoder(run_dir)


@pytest.mark.parametrize("stage", [1, 2])
def test_ray_deepspeed_zero(shard_set, tmp_path, ray_local, stage, request):
    """ZeRO-1 on local storage; ZeRO-2 streams its shards from S3 and checkpoints to S3."""
    from hncl.train.launch import pretrain

    if stage == 2:
        fs, bucket = request.getfixturevalue("s3")
        fs.put(shard_set, f"{bucket}/shards/", recursive=True)
        shards, out = f"s3://{bucket}/shards/synthetic", f"s3://{bucket}/runs"
    else:
        shards, out = shard_set, str(tmp_path)
    cfg = load_config("configs/debug.yaml", overrides(shards, out, f"zero{stage}", **{
        "dist.num_workers": 2, "dist.strategy": "deepspeed", "dist.zero_stage": stage, "optim.name": "adamw",
        "optim.lr": 0.001}))
    pretrain(cfg)
    if stage == 2:
        local = tmp_path / "from_s3"
        fs.get(f"{bucket}/runs/zero2", str(local), recursive=True)
        run_dir = str(local)
    else:
        run_dir = str(tmp_path / "zero1")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8] and all(m["loss"] == m["loss"] for m in metrics)
    ckpt = os.path.join(run_dir, "checkpoint_00000008")
    files = {os.path.relpath(os.path.join(r, f), ckpt) for r, _, fs_ in os.walk(ckpt) for f in fs_}
    assert {"queue_rank0.pt", "queue_rank1.pt", "train_state.json"} <= files
    assert any(f.startswith("deepspeed/") and "optim_states" in f for f in files)  # ZeRO partitions per rank
    check_encoder(run_dir)


def test_ray_job_submit_runs_cluster_train_py_with_paths_relative_to_the_working_dir(shard_set, tmp_path, ray_local):
    """The driver of `ray job submit --working-dir` runs in Ray's copy of the folder: a relative
    shard path means the copy's shards, which every worker must then find (Train starts each
    worker in a directory of its own)."""
    import shutil

    _, dashboard, _ = ray_local
    work = tmp_path / "project"
    shutil.copytree(shard_set, work / "data" / "synth")
    shutil.copytree(os.path.join(REPO, "configs"), work / "configs")
    shutil.copytree(os.path.join(REPO, "cluster"), work / "cluster")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    args = overrides("data/synth", tmp_path / "runs", "job", steps=4, **{"dist.num_workers": 1})
    job = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address",
                          dashboard, "--working-dir", str(work), "--", "python", "cluster/train.py", "--config",
                          "configs/debug.yaml", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in job.stdout.lower()
    assert "[hncl] step 4" in job.stdout + job.stderr  # the job's logs show training
    assert "Ray Train on the Ray cluster at" in job.stdout  # the job's own cluster ($RAY_ADDRESS)
    run_dir = str(tmp_path / "runs" / "job")
    assert [m["step"] for m in read_metrics(run_dir)] == [2, 4]
    used = load_config(os.path.join(run_dir, "config.yaml")).data.train_shards
    assert os.path.isabs(used) and used.endswith("/data/synth") and not used.startswith(str(work))


def test_a_ray_resume_removes_the_checkpoint_folders_ray_never_committed(tmp_path):
    """A 4-rank save of step 8 cut off by a failure left rank files in checkpoint_00000008; Ray
    resumes from step 4 on 2 ranks. That folder must go before the run saves step 8 again (Ray
    would merge the new files into it: 'has 4 slices for world size 2' on the next restore);
    committed checkpoints stay."""
    import ray.train

    from hncl.train.session import RaySession, checkpoint_name

    run = tmp_path / "run"
    for step, ranks in ((4, 2), (8, 4)):
        folder = run / checkpoint_name(step)
        folder.mkdir(parents=True)
        for r in range(ranks):
            (folder / f"queue_rank{r}.pt").write_bytes(b"%d" % step)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files are not ours

    class Train:  # what ray.train.get_checkpoint hands a restarted worker: the last committed one
        Checkpoint = ray.train.Checkpoint

        @staticmethod
        def get_checkpoint():
            return ray.train.Checkpoint(str(run / checkpoint_name(4)))

    session = RaySession.__new__(RaySession)
    super(RaySession, session).__init__(str(run))
    session._train = Train
    with session.restored() as folder:
        assert sorted(os.listdir(folder)) == ["queue_rank0.pt", "queue_rank1.pt"]
    assert sorted(os.listdir(run)) == [checkpoint_name(4), "checkpoint_manager_snapshot.json"]
