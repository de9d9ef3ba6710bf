"""Multi-node for real: a two-node Ray cluster on this machine (head 127.0.0.2, node 127.0.0.3 in
a mount namespace of its own: tests/multinode.py), S3 on moto's server, every driver a process
of its own (`hncl pretrain`, `cluster/make_shards.py --ray`, `ray job submit`), as on a cluster.

    pytest -m multinode      # exactly these tests
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from multinode import HEAD_IP, NODE2_IP, REPO, TwoNodeCluster, free_port

pytestmark = [pytest.mark.multinode, pytest.mark.ray, pytest.mark.slow]
N, SHARD = 240, 30


@pytest.fixture(scope="session")
def two_nodes(s3_endpoint):
    """The session's two-node cluster. Its nodes know no S3 settings: workers get the driver's."""
    from conftest import moto_env

    cluster = TwoNodeCluster(extra_env=moto_env(s3_endpoint)).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _moto_env(s3_endpoint, monkeypatch):
    """The drivers started by these tests, and this process, talk to moto."""
    from conftest import moto_env

    for k, v in moto_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def cluster(two_nodes):
    two_nodes.ensure_node2()  # a test that lost node 2 must not take the next one down with it
    return two_nodes


@pytest.fixture(scope="module")
def s3_shards(s3_endpoint, tmp_path_factory):
    """A bucket holding a 240-sample set in 8 shards (s3://BUCKET/shards) and its local twin."""
    import s3fs

    from hncl.data.make_shards import ShardJob, make_shards

    local = tmp_path_factory.mktemp("multinode") / "synthetic"
    make_shards(ShardJob(source="synthetic", out=str(local), source_options=(("num_samples", N), ("seed", 0),
                                                                              ("size", 112))),
                shard_size=SHARD, descriptor_dim=32, progress=False, log=lambda *_: None)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint, use_listings_cache=False)
    bucket = f"mn-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.put(str(local), f"{bucket}/", recursive=True)
    yield fs, bucket, f"s3://{bucket}/synthetic", str(local)
    fs.rm(bucket, recursive=True)


def set_ids(root):
    from hncl.data.shards import ShardSet, eval_pipeline

    return [i for b in eval_pipeline(ShardSet.open(root), 64) for i in b["id"].tolist()]


def pretrain_args(shards, out, name, steps=8, **extra):
    o = {"data.train_shards": shards, "run.output_dir": out, "run.name": name, "optim.epochs": 1,
         "data.steps_per_epoch": steps, "data.batch_size": 16, "data.loader_workers": 1, "run.log_every": 4,
         "run.checkpoint_every": 4, "run.keep_checkpoints": 20, "method.queue_size": 256,
         "dist.num_workers": 2, "dist.placement": "STRICT_SPREAD", **extra}
    return [sys.executable, "-m", "hncl.cli", "pretrain", "--config", "configs/debug.yaml",
            *[f"{k}={v}" for k, v in o.items()]]


def run(cmd, cluster, timeout=600, **env):
    return subprocess.run(cmd, cwd=REPO, env=dict(cluster.env, **env), capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc) -> str:
    """The CLI's one-line error: the last line of stderr (Ray's own log lines come before it)."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert lines and lines[-1].startswith("hncl pretrain: error: "), proc.stderr[-3000:]
    return lines[-1]


def committed_step(fs, run_dir):
    """Step of the newest checkpoint Ray Train committed (its snapshot), or None."""
    try:
        snap = json.loads(fs.cat(f"{run_dir}/checkpoint_manager_snapshot.json"))
        return snap["latest_checkpoint_result"]["metrics"]["step"]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def queue_digests_on_s3(fs, checkpoint, world=2):
    import io

    from hncl.core.queue import state_digest

    return [state_digest(torch.load(io.BytesIO(fs.cat(f"{checkpoint}/queue_rank{r}.pt")), weights_only=True))
            for r in range(world)]


# --- pretraining across the nodes ----------------------------------------------------------------
def test_pretraining_on_two_nodes_reads_each_sample_of_an_epoch_once_and_checkpoints_to_s3(cluster, s3_shards):
    """One worker per node (STRICT_SPREAD), gloo between them, shards and run directory on S3; with
    2 loader workers per rank there are 4 readers of the 8 shards: epoch 0 is read exactly once."""
    fs, bucket, shards, local = s3_shards
    proc = run(pretrain_args(shards, f"s3://{bucket}/runs", "two", **{"run.record_sample_ids": "true",
                                                                       "data.loader_workers": 2}), cluster)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_dir = f"{bucket}/runs/two"
    ranks = [json.loads(fs.cat(f"{run_dir}/sample_ids_rank{r}.json")) for r in (0, 1)]
    assert sorted(r["node_ip"] for r in ranks) == [HEAD_IP, NODE2_IP]  # one rank per node
    assert all(len(r["ids"]) == 8 * 16 for r in ranks)  # equal steps on every rank
    seen = [(i, e) for r in ranks for i, e in zip(r["ids"], r["epochs"])]
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    epoch0 = [[i for i, e in zip(r["ids"], r["epochs"]) if e == 0] for r in ranks]
    assert sorted(epoch0[0] + epoch0[1]) == sorted(set_ids(local))  # every sample, each by one rank
    assert len(epoch0[0]) == len(epoch0[1]) == N // 2  # 4 readers: 2 whole shards each
    assert [json.loads(l)["step"] for l in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()] == [4, 8]
    for step in (4, 8):
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run_dir}/checkpoint_{step:08d}")}
        assert {"queue_rank0.pt", "queue_rank1.pt", "model.safetensors", "optimizer.pt", "train_state.json"} <= names
    assert json.loads(fs.cat(f"{run_dir}/checkpoint_00000008/train_state.json"))["world_size"] == 2
    assert fs.exists(f"{run_dir}/encoder.safetensors") and fs.exists(f"{run_dir}/config.yaml")


def _queue_runs():
    """Both kinds of the single-node queue test, on the ranks of a Ray cluster."""
    from test_queue import _sharded_run

    return {"random": _sharded_run("random", "all_gather"), "ties": _sharded_run("ties", "all_to_all")}


def test_sharded_queue_across_nodes_equals_one_process_holding_the_union(cluster, tmp_path):
    from test_queue import assert_equal_to_single_process_union

    out = tmp_path / "queue"  # a disk both nodes share
    proc = run([sys.executable, os.path.join(REPO, "tests", "multinode_job.py"), "test_multinode:_queue_runs",
                str(out), "2"], cluster)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(r["node_ip"] for r in ranks) == [HEAD_IP, NODE2_IP]
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    for kind in ("random", "ties"):
        assert_equal_to_single_process_union([r["result"][kind] for r in ranks], 2, kind)


# --- bad input and faults: one line, before training, nothing lost ------------------------------
def test_unshared_disk_and_s3_unreachable_from_a_node_stop_before_training_in_one_line(cluster, s3_shards,
                                                                                         s3_endpoint):
    if not cluster.isolated:
        pytest.skip("this kernel gives node 2 no mount namespace (needs root or unprivileged user namespaces), "
                    "so it shares every disk and host name with the head: no unshared disk to refuse")
    fs, bucket, shards, local_shards = s3_shards
    # a run directory on a disk node 2 does not share (its own tmpfs over private/)
    private_runs = os.path.join(cluster.private, "runs")
    proc = run(pretrain_args(local_shards, private_runs, "unshared"), cluster)
    line = error_line(proc)
    assert f"run.output_dir={private_runs} is not visible from node {NODE2_IP}" in line
    assert "use s3://... or a filesystem every node mounts at the same path" in line
    assert not os.path.exists(os.path.join(private_runs, "unshared")), "training started"
    assert os.listdir(private_runs) == []  # the check's marker file is gone
    proc = run([sys.executable, "cluster/make_shards.py", "--source", "synthetic", "--num-samples", "60", "--out",
                os.path.join(cluster.private, "set"), "--ray", cluster.address, "--quiet"], cluster)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(
        f"hncl make-shards: error: --out={cluster.private}/set is not visible from node {NODE2_IP}"), last
    # S3 that node 2 cannot reach: the endpoint by this machine's name, which node 2 resolves elsewhere
    if socket.gethostbyname(cluster.hostname) == "127.0.0.1":
        endpoint = s3_endpoint.replace("127.0.0.1", cluster.hostname)
        proc = run(pretrain_args(shards, f"s3://{bucket}/runs", "unreachable"), cluster, AWS_ENDPOINT_URL_S3=endpoint)
        line = error_line(proc)
        assert f"run.output_dir=s3://{bucket}/runs is not reachable from node {NODE2_IP}" in line
        assert endpoint in line and f"data.train_shards={shards} is not reachable from node {NODE2_IP}" in line
        assert not fs.exists(f"{bucket}/runs/unreachable")


def test_wrong_address_and_a_node_that_never_joins_stop_in_one_line(cluster, s3_shards):
    _, bucket, shards, _ = s3_shards
    # a wrong address: refused before ray.init (whose reconnect attempts take a minute and end in a traceback)
    proc = run(pretrain_args(shards, f"s3://{bucket}/runs", "nowhere") + ["--address", f"{HEAD_IP}:{free_port()}"],
               cluster)
    assert re.search(rf"cannot reach a Ray cluster at {HEAD_IP}:\d+ .*check --address / \$RAY_ADDRESS",
                     error_line(proc))
    # a node that never joins: 3 workers, one per node, on 2 nodes; Ray Train alone would wait forever
    proc = run(pretrain_args(shards, f"s3://{bucket}/runs", "third", **{"dist.node_wait_s": 5, "dist.num_workers": 3,
                                                                        "method.queue_size": 255}), cluster)
    assert "waiting up to dist.node_wait_s=5 s for 1 more" in proc.stdout
    line = error_line(proc)
    assert "stopped after waiting dist.node_wait_s=5 s" in line
    assert "needs 3 workers x {CPU: 1} on distinct nodes" in line
    assert f"2 alive nodes ({HEAD_IP} {{CPU: 1}}, {NODE2_IP} {{CPU: 1}})" in line and "1 worker short" in line
    assert "No checkpoint was committed yet" in line


# --- the cluster commands ---------------------------------------------------------------------
def test_make_shards_ray_on_two_nodes_writes_s3_byte_identical_to_a_local_run(cluster, s3_shards):
    from ray.util.state import list_nodes, list_tasks

    from hncl.data.make_shards import verify

    fs, bucket, _, local = s3_shards
    out = f"s3://{bucket}/ray-made"
    proc = run([sys.executable, "cluster/make_shards.py", "--source", "synthetic", "--num-samples", str(N),
                "--shard-size", str(SHARD), "--descriptor-dim", "32", "--out", out, "--ray", cluster.address,
                "--quiet"], cluster)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [s["sha256"] for s in verify(out)["shards"]] == [s["sha256"] for s in verify(local)["shards"]]
    # the descriptor is fitted in the driver, as without --ray (an SVD: its last bits follow the thread count)
    from hncl.data.shards import ShardSet

    made, twin = ShardSet.open(out).descriptor(), ShardSet.open(local).descriptor()
    assert torch.allclose(made.components, twin.components, atol=1e-5) and torch.allclose(made.mean, twin.mean)
    ips = {n.node_id: n.node_ip for n in list_nodes(address=cluster.dashboard, raise_on_missing_output=False)}
    tasks = list_tasks(address=cluster.dashboard, filters=[("func_or_class_name", "=", "run_shard")], detail=True,
                       limit=1000, raise_on_missing_output=False)
    where = [ips[t.node_id] for t in tasks if t.state == "FINISHED"]
    assert len(where) == N // SHARD and set(where) == {HEAD_IP, NODE2_IP}  # spread over both nodes


def test_ray_job_submit_on_two_nodes_with_s3(cluster, s3_shards, s3_endpoint, tmp_path):
    """The README's command: the job's driver runs on the head in the uploaded folder; the S3
    settings travel with the job (the nodes have none) and on to the workers on both nodes."""
    fs, bucket, shards, _ = s3_shards
    work = tmp_path / "project"
    for folder in ("configs", "cluster"):
        shutil.copytree(os.path.join(REPO, folder), work / folder)
    s3_env = {k: cluster.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")}
    args = pretrain_args(shards, f"s3://{bucket}/runs", "job")[4:]  # --config configs/debug.yaml key=value ...
    env = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")}
    job = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address",
                          cluster.dashboard, "--working-dir", ".", "--runtime-env-json",
                          json.dumps({"env_vars": s3_env}), "--", "python", "cluster/train.py", *args],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0 and "succeeded" in job.stdout.lower(), (job.stdout + job.stderr)[-4000:]
    assert f"Ray Train on the Ray cluster at {cluster.address}" in job.stdout
    run_dir = f"{bucket}/runs/job"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run_dir)}
    assert {"config.yaml", "metrics.jsonl", "metrics.csv", "encoder.safetensors", "encoder.json",
            "checkpoint_00000004", "checkpoint_00000008"} <= names
    assert {"queue_rank0.pt", "queue_rank1.pt"} <= {p.rsplit("/", 1)[-1]
                                                    for p in fs.ls(f"{run_dir}/checkpoint_00000008")}


# --- losing a node ------------------------------------------------------------------------------
def _run_until_committed(cluster, fs, cmd, run_dir, at_least, log):
    """Start the driver; return it once Ray Train has committed a checkpoint at >= `at_least`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        step = committed_step(fs, run_dir)
        if step is not None and step >= at_least:
            return proc, step
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"no checkpoint >= {at_least} committed (driver exit {proc.poll()}): "
                         f"{open(log.name).read()[-3000:]}")


def trained_on_s3(fs, run_dir):
    """Every (sample id, data epoch) the final weights were trained on (run.record_sample_ids's
    records written with each checkpoint), whatever world sizes wrote them."""
    pairs = []
    for path in sorted(fs.ls(f"{run_dir}/sample_ids")):
        record = json.loads(fs.cat(path))
        pairs += list(zip(record["ids"], record["epochs"]))
    return pairs


def test_lost_node_stops_the_run_then_it_resumes_on_the_node_left_and_again_on_both(cluster, s3_shards, tmp_path):
    """Node 2 (its raylet, agents and workers) is SIGKILLed mid-run. Not back within dist.node_wait_s:
    the run stops in one line naming what is missing, the last committed checkpoint, which is
    intact, and how to go on now on the node left. That command resumes there on one worker (its
    driver killed after a checkpoint); node 2 back, the first command resumes on both, node 2 is
    lost again but back in time and the run resumes with both queue slices exactly restored, and
    completes: every sample once per data epoch, every step once."""
    fs, bucket, shards, local = s3_shards
    run_dir = f"{bucket}/runs/lost"
    cmd = pretrain_args(shards, f"s3://{bucket}/runs", "lost", steps=40,
                        **{"dist.node_wait_s": 10, "run.record_sample_ids": "true"})
    with open(tmp_path / "first.log", "w") as log:
        proc, seen = _run_until_committed(cluster, fs, cmd, run_dir, 8, log)
        cluster.kill_node2()
        proc.wait(timeout=300)  # Ray Train's own default would wait forever
    output = open(tmp_path / "first.log").read()
    line = [ln for ln in output.splitlines() if ln.startswith("hncl pretrain: error: ")]
    assert proc.returncode == 1 and len(line) == 1, output[-4000:]
    m = re.search(r"Last committed checkpoint: s3://(\S+)/checkpoint_(\d{8}) \(step (\d+)\); rerun the same command",
                  line[0])
    assert m and "stopped after waiting dist.node_wait_s=10 s" in line[0], line[0]
    assert "needs 2 workers x {CPU: 1} on distinct nodes" in line[0] and "1 worker short" in line[0], line[0]
    assert f"1 alive node ({HEAD_IP} {{CPU: 1}})" in line[0], line[0]
    assert "or now on the nodes there are: the same command with dist.num_workers=1 " in line[0], line[0]
    stopped_at = int(m.group(3))
    assert m.group(1) == run_dir and stopped_at >= seen and int(m.group(2)) == stopped_at
    checkpoint = f"{run_dir}/checkpoint_{stopped_at:08d}"
    assert json.loads(fs.cat(f"{checkpoint}/train_state.json"))["step"] == stopped_at

    # what the line says: on the node left, until it has committed a checkpoint; then its driver
    # is killed (a preempted head job)
    with open(tmp_path / "alone.log", "w") as log:
        proc, _ = _run_until_committed(cluster, fs, cmd + ["dist.num_workers=1"], run_dir, stopped_at + 4, log)
        proc.kill()
        proc.wait(timeout=60)
    time.sleep(5)  # the job's actors die with their driver: nothing commits after this
    alone_at = committed_step(fs, run_dir)
    output = open(tmp_path / "alone.log").read()
    assert f"resumed at step {stopped_at}" in output and "the rest of data epoch" in output, output[-4000:]

    # node 2 back; the first command resumes on both; node 2 lost again mid-run and back within node_wait_s
    cluster.ensure_node2()
    cmd = [a for a in cmd if not a.startswith("dist.node_wait_s=")] + ["dist.node_wait_s=300"]
    with open(tmp_path / "second.log", "w") as log:
        proc, seen = _run_until_committed(cluster, fs, cmd, run_dir, alone_at + 8, log)
        cluster.kill_node2()
        time.sleep(3)
        cluster.start_node2()
        proc.wait(timeout=500)
    output = open(tmp_path / "second.log").read()
    assert proc.returncode == 0, output[-4000:]
    assert "resumed at step" in output and "finished 40 steps" in output
    resumes = [json.loads(l) for l in fs.cat(f"{run_dir}/resumes.jsonl").decode().splitlines()]
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumes[:2]] == \
        [(stopped_at, 2, 1), (alone_at, 1, 2)]
    assert len(resumes) == 3
    back = resumes[2]  # Ray restarted from the newest checkpoint committed when node 2 was lost
    assert back["step"] >= seen and back["saved_world_size"] == back["world_size"] == 2
    assert back["queue_digests"] == queue_digests_on_s3(fs, f"{run_dir}/checkpoint_{back['step']:08d}")
    steps = [json.loads(l)["step"] for l in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(4, 41, 4))  # every step logged once, none lost or doubled
    assert fs.exists(f"{run_dir}/encoder.safetensors")
    pairs = trained_on_s3(fs, run_dir)
    assert len(pairs) == 40 * 32 and len(set(pairs)) == len(pairs)  # no (sample, data epoch) twice
    everything = sorted(set_ids(local))
    epochs = sorted({e for _, e in pairs})
    for epoch in epochs[:-1]:  # every data epoch but the last one trained whole
        assert sorted(i for i, e in pairs if e == epoch) == everything, epoch
