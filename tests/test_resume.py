"""Resuming continues the run it interrupted (#21), measured from outside as a user meets it:
torchrun runs on an odd-sized set (the last shard short), killed right after a checkpoint with
run.fail_at_step and resumed on the same, fewer and more ranks, with DDP and DeepSpeed ZeRO-2,
against the uninterrupted run, through metrics.jsonl and run.record_sample_ids."""

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

from hncl.data.make_shards import ShardJob, make_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 230  # 4 shards of 50 and one of 30
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def odd_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "odd"
    make_shards(ShardJob(source="synthetic", out=str(out), source_options=(("num_samples", N), ("seed", 2),
                                                                          ("size", 112))),
                shard_size=50, descriptor_dim=32, progress=False, log=lambda *_: None)
    return str(out)


def pretrain(ranks, shards, out, name, strategy, **extra):
    o = {"data.train_shards": shards, "run.output_dir": out, "run.name": name, "optim.epochs": 4,
         "data.steps_per_epoch": "null", "data.batch_size": 16, "data.loader_workers": 1, "data.shuffle_buffer": 40,
         "run.log_every": 1, "run.checkpoint_every": 5, "run.keep_checkpoints": 10, "method.queue_size": 128,
         "run.record_sample_ids": "true", **extra}
    if strategy == "zero2":
        o.update({"dist.strategy": "deepspeed", "dist.zero_stage": 2})
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
                "-m", "hncl.cli"] if ranks > 1 else [sys.executable, "-m", "hncl.cli"]
    return subprocess.run([*launcher, "pretrain", "--config", "configs/debug.yaml", "--debug",
                           *[f"{k}={v}" for k, v in o.items()]], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})


def metrics(run_dir):
    return {m["step"]: m for m in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))}


def trained(run_dir):
    """Every (sample id, data epoch) the final weights were trained on: the records written with
    each checkpoint (sample_ids/), whatever world sizes wrote them."""
    pairs = []
    for name in sorted(os.listdir(os.path.join(run_dir, "sample_ids"))):
        record = json.load(open(os.path.join(run_dir, "sample_ids", name)))
        pairs += list(zip(record["ids"], record["epochs"]))
    return pairs


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_killed_runs_resume_exactly_on_the_same_ranks_and_each_sample_once_on_fewer_or_more(odd_set, tmp_path,
                                                                                           strategy):
    out = str(tmp_path)
    whole = pretrain(2, odd_set, out, "whole", strategy)
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = metrics(os.path.join(out, "whole"))
    steps = -(-4 * N // 32)  # 4 epochs of the set in global batches of 32
    assert sorted(reference) == list(range(1, steps + 1))

    killed = pretrain(2, odd_set, out, "cut", strategy, **{"run.fail_at_step": 11, "run.fail_rank": 1})
    assert killed.returncode != 0 and "fault injection: rank 1 exits at step 11" in killed.stdout
    cut = os.path.join(out, "cut")
    shutil.copytree(cut, os.path.join(out, "same"))

    # the same world size: from the checkpoint (step 10) on, the uninterrupted run, bit for bit
    same = pretrain(2, odd_set, out, "same", strategy)
    assert same.returncode == 0 and "resumed at step 10" in same.stdout, same.stderr[-3000:]
    again = metrics(os.path.join(out, "same"))
    assert sorted(again) == sorted(reference)
    assert [again[s]["loss"] for s in again] == [reference[s]["loss"] for s in again]

    # 2 ranks -> 1 (killed again at step 21, after the checkpoint at 20) -> 2: each sample once
    os.remove(os.path.join(cut, ".fault_injected"))
    one = pretrain(1, odd_set, out, "cut", strategy, **{"run.fail_at_step": 21, "run.fail_rank": 0})
    assert one.returncode != 0 and "fault injection: rank 0 exits at step 21" in one.stdout, one.stderr[-3000:]
    assert "the rest of data epoch 1 once over them" in one.stdout
    two = pretrain(2, odd_set, out, "cut", strategy)
    assert two.returncode == 0 and "resumed at step 20" in two.stdout, two.stderr[-3000:]
    resumes = [json.loads(line) for line in open(os.path.join(cut, "resumes.jsonl"))]
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumes] == [(10, 2, 1), (20, 1, 2)]

    pairs = trained(cut)
    assert len(pairs) == len(trained(os.path.join(out, "whole"))) == steps * 32  # the same amount of training
    assert max(collections.Counter(pairs).values()) == 1  # no (sample, data epoch) twice
    by_epoch = collections.defaultdict(set)
    for i, e in pairs:
        by_epoch[e].add(i)
    assert sorted(by_epoch) == [0, 1, 2, 3, 4] and all(len(by_epoch[e]) == N for e in range(4))  # epochs whole
    resumed = metrics(cut)
    peak = max(m["lr"] for m in reference.values())
    assert sorted(resumed) == sorted(reference)
    assert max(abs(resumed[s]["lr"] - reference[s]["lr"]) for s in reference) <= 1e-9 * peak
    assert [resumed[s]["samples"] for s in sorted(resumed)] == [32 * s for s in sorted(reference)]
