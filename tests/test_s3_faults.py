"""S3 under faults, on a real S3 endpoint (moto's server) behind a proxy that refuses, black-holes
or cuts connections (tests/faults.py): transient outages are survived with nothing lost or read
twice, permanent faults stop in one line naming the object and the cause within the configured
deadline, lost data is counted in samples, and nothing is left in the temp folder."""

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from faults import FaultProxy
from hncl.config import load_config
from hncl.data.make_shards import ShardJob, make_shards, verify
from hncl.errors import UserError
from hncl.infra import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"HNCL_S3_DEADLINE": "20", "HNCL_S3_READ_TIMEOUT": "3", "HNCL_S3_CONNECT_TIMEOUT": "3"}


@pytest.fixture
def faulty_s3(s3, s3_endpoint, monkeypatch, tmp_path):
    """(proxy, bucket): the moto endpoint reached through a FaultProxy; short timeouts; a temp
    folder of the test's own (checked empty by the tests)."""
    fs, bucket = s3
    host, port = s3_endpoint.rsplit("/", 1)[1].split(":")
    proxy = FaultProxy(host, int(port))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    for k, v in SETTINGS.items():
        monkeypatch.setenv(k, v)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield proxy, bucket
    proxy.close()


def leftovers(tmp_path):
    return [os.path.relpath(os.path.join(r, f), tmp_path / "tmp") for r, _, fs_ in os.walk(tmp_path / "tmp")
            for f in fs_]


def synthetic(out, n=120, shard_size=20):
    return make_shards(ShardJob(source="synthetic", out=out, source_options=(("num_samples", n), ("seed", 2),
                                                                             ("size", 64)), image_size=64),
                       shard_size=shard_size, descriptor_dim=8, progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_make_shards_survives_an_upload_outage_and_leaves_no_temp_files(faulty_s3, tmp_path, monkeypatch, caplog):
    proxy, bucket = faulty_s3
    out = f"s3://{bucket}/sets/outage"
    real_put = storage.put_file
    calls = {"n": 0}

    def put_during_an_outage(local, url):
        calls["n"] += 1
        if calls["n"] == 3:  # the second shard's upload meets 3 s of refused connections
            with proxy.outage(3, "refuse"):
                time.sleep(0.2)
                return real_put(local, url)
        return real_put(local, url)

    monkeypatch.setattr(storage, "put_file", put_during_an_outage)
    with caplog.at_level(logging.INFO, logger="hncl.infra.s3"):
        manifest = synthetic(out)
    assert any("retrying" in r.getMessage() for r in caplog.records)  # the outage was met, and survived
    assert manifest["num_samples"] == 120 and verify(out)["num_samples"] == 120  # every shard, every id once
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_an_upload_and_a_read_whose_answers_go_silent_are_retried_after_the_read_timeout(faulty_s3, tmp_path,
                                                                                           caplog):
    """Answers lost for 7 s (a black hole: requests arrive, nothing comes back) while an upload and
    a read are under way: each request gives up after HNCL_S3_READ_TIMEOUT=3 (s3fs tries twice per
    attempt) and is retried, and both succeed within HNCL_S3_DEADLINE=20. (botocore's "Expect: 100-continue" made aiohttp
    wait for an answer with no timeout: an upload hung for the whole deadline, then failed.)"""
    proxy, bucket = faulty_s3
    payload = os.urandom(300_000)
    storage.write_bytes(f"s3://{bucket}/warm", b"x")  # a pooled connection that will go silent
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    with caplog.at_level(logging.INFO, logger="hncl.infra.s3"):
        with proxy.outage(7, "blackhole"):
            time.sleep(0.1)
            storage.put_file(str(local), f"s3://{bucket}/silent/upload.bin")
        uploaded = [r.getMessage() for r in caplog.records if "put_object" in r.getMessage()]
        with proxy.outage(7, "blackhole"):
            time.sleep(0.1)
            assert storage.read_bytes(f"s3://{bucket}/silent/upload.bin") == payload
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert uploaded and all("Read timeout" in m for m in uploaded)  # the upload timed out, then went through
    assert len(retried) > len(uploaded)  # ... and so did the read
    assert not local.exists() and leftovers(tmp_path) == []


def _debug_run(shards, out, name, **extra):
    from hncl.train.launch import pretrain

    o = {"data.train_shards": shards, "run.output_dir": out, "run.name": name, "optim.epochs": 1,
         "data.steps_per_epoch": 6, "data.batch_size": 16, "data.loader_workers": 0, "run.log_every": 1,
         "run.checkpoint_every": 3, "method.queue_size": 128, "model.width": 8, "data.image_size": 32,
         "data.shuffle_buffer": 20, **extra}
    pretrain(load_config(os.path.join(REPO, "configs", "debug.yaml"), [f"{k}={v}" for k, v in o.items()]), debug=True)


def _metrics(url):
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines()]


@pytest.mark.slow
def test_training_reads_and_checkpoint_uploads_survive_outages_with_nothing_lost(faulty_s3, tmp_path, monkeypatch,
                                                                                 caplog):
    """A cut connection mid-shard and refused connections during a checkpoint upload: the run
    trains on exactly the samples of a run without faults (the stream is deterministic: equal
    per-step losses mean nothing was lost or read twice) and its checkpoints are complete."""
    from hncl.data.shards import ShardSamples
    from hncl.train.session import LocalSession

    proxy, bucket = faulty_s3
    shards = f"s3://{bucket}/sets/train"
    synthetic(shards, n=96, shard_size=12)
    _debug_run(shards, f"s3://{bucket}/runs", "calm")

    real_samples, real_save = ShardSamples._samples, LocalSession.save
    met = {"cut": 0, "refuse": 0}

    def samples_cut_midway(self, url):  # the 3rd shard opened: its connection cut after 4 KB
        met["cut"] += 1
        if met["cut"] == 3:
            proxy.cut_after, proxy.mode = 4096, "cut"
            try:
                yield from real_samples(self, url)
            finally:
                proxy.mode = "pass"
            return
        if met["cut"] == 4:  # the reopened shard reads normally
            proxy.mode = "pass"
        yield from real_samples(self, url)

    def save_during_an_outage(self, step, write, metrics):
        met["refuse"] += 1
        with proxy.outage(2.5, "refuse"):
            time.sleep(0.1)
            return real_save(self, step, write, metrics)

    monkeypatch.setattr(ShardSamples, "_samples", samples_cut_midway)
    monkeypatch.setattr(LocalSession, "save", save_during_an_outage)
    with caplog.at_level(logging.INFO):
        _debug_run(shards, f"s3://{bucket}/runs", "faulty")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "broke off" in messages and "retrying" in messages and met["refuse"] == 2
    calm, faulty = _metrics(f"s3://{bucket}/runs/calm/metrics.jsonl"), _metrics(f"s3://{bucket}/runs/faulty/metrics.jsonl")
    assert [r["loss"] for r in faulty] == [r["loss"] for r in calm] and all(r["skipped"] == 0 for r in faulty)
    for step in (3, 6):
        names = storage.listdir(f"s3://{bucket}/runs/faulty/checkpoint_{step:08d}")
        assert {"_COMPLETE", "model.safetensors", "queue_rank0.pt", "train_state.json"} <= set(names)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_quarter_of_the_shards_missing_stops_the_run_naming_them(faulty_s3, tmp_path):
    proxy, bucket = faulty_s3
    shards = f"s3://{bucket}/sets/holes"
    manifest = synthetic(shards, n=160, shard_size=8)  # 20 shards
    gone = [s["name"] for s in manifest["shards"][::4]]  # 5 of 20: a quarter of the data
    for name in gone:
        storage.remove(f"{shards}/{name}")
    with pytest.raises(UserError) as err:
        _debug_run(shards, str(tmp_path / "runs"), "holes", **{"data.steps_per_epoch": 30})
    msg = str(err.value)
    assert "missing shard" in msg and "above data.max_skip_fraction=0.01" in msg and "\n" not in msg
    named = set(re.findall(r"shard-\d{6}\.tar", msg.split("check the set")[0]))
    assert named and named <= set(gone)  # where the samples were lost, and only there
    lost, expected = (int(x) for x in msg.split(" samples (")[0].split(" of "))
    assert lost > 0 and lost % 8 == 0  # counted in samples: whole shards of 8, not one error each
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_run_killed_from_outside_resumes_and_its_temp_files_are_swept(faulty_s3, tmp_path):
    """SIGKILL in the middle of an S3 run: what it had in the temp folder (metrics staging, a
    checkpoint being written) stays behind, as it must; rerunning the command resumes from the
    last complete checkpoint, trains every step exactly once, and leaves the temp folder empty."""
    proxy, bucket = faulty_s3
    shards = f"s3://{bucket}/sets/killed"
    synthetic(shards, n=96, shard_size=12)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TMPDIR=str(tmp_path / "tmp"))
    run = f"s3://{bucket}/runs/killed"
    args = [sys.executable, "-m", "hncl.cli", "pretrain", "--config", os.path.join(REPO, "configs", "debug.yaml"),
            "--debug", f"data.train_shards={shards}", f"run.output_dir=s3://{bucket}/runs", "run.name=killed",
            "optim.epochs=1", "data.steps_per_epoch=40", "data.batch_size=16", "data.loader_workers=0",
            "run.log_every=1", "run.checkpoint_every=4", "model.width=8", "data.image_size=32",
            "method.queue_size=128", "data.shuffle_buffer=20"]
    first_log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=first_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        def last_committed():  # checkpoint 8 itself may be gone already (keep_checkpoints=2)
            steps = [int(n.split("_")[1]) for n in storage.listdir(run) if re.fullmatch(r"checkpoint_\d{8}", n)]
            return max([s for s in steps if storage.exists(f"{run}/checkpoint_{s:08d}/_COMPLETE")], default=0)

        while last_committed() < 8 and first.poll() is None:
            assert time.time() < deadline, "the first run made no second checkpoint in 240 s"
            time.sleep(0.2)
        assert first.poll() is None, ("the run ended before it could be killed",
                                      (tmp_path / "first.log").read_text()[-3000:])
    finally:
        first.kill()
        first.wait()
        first_log.close()
    left = leftovers(tmp_path)
    assert any(p.startswith("hncl-metrics-") for p in left), left  # the kill did leave files behind

    second = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    steps = [r["step"] for r in _metrics(f"{run}/metrics.jsonl")]
    assert steps == list(range(1, 41))  # resumed: every step once, none lost, none twice
    resumes = [json.loads(line) for line in storage.read_bytes(f"{run}/resumes.jsonl").decode().splitlines()]
    assert len(resumes) == 1 and resumes[0]["step"] >= 8
    assert leftovers(tmp_path) == []


def _cli(args, env, cwd, timeout=120):
    t = time.time()
    run = subprocess.run([sys.executable, "-m", "hncl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return run, time.time() - t


@pytest.mark.slow
def test_unreachable_wrong_credentials_and_missing_bucket_are_one_line_each(faulty_s3, tmp_path):
    """Each within its deadline (never a hang), one line naming the cause and the URL."""
    from hncl.core.dist import free_port

    proxy, bucket = faulty_s3
    shards = f"s3://{bucket}/sets/ok"
    synthetic(shards, n=24, shard_size=12)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HNCL_S3_DEADLINE="6", HNCL_S3_READ_TIMEOUT="2", HNCL_S3_CONNECT_TIMEOUT="2", TMPDIR=str(tmp_path / "tmp"))
    pretrain = ["pretrain", "--config", os.path.join(REPO, "configs", "debug.yaml"), "--debug",
                f"run.output_dir={tmp_path}/runs"]
    auth_port = free_port()
    moto_auth = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                                  "-p", str(auth_port)], env=dict(env, INITIAL_NO_AUTH_ACTION_COUNT="0"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proxy.mode = "blackhole"
        cases = [  # (what, extra env, args, words the one line must hold)
            ("black-holed endpoint", {}, [*pretrain, f"data.train_shards={shards}"],
             ["cannot reach the S3 endpoint", proxy.url, f"{shards}/manifest.json"]),
            ("nothing listening", {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"},
             [*pretrain, f"data.train_shards={shards}"], ["cannot reach the S3 endpoint", "Could not connect"]),
            ("missing bucket", {"AWS_ENDPOINT_URL_S3": os.environ["AWS_ENDPOINT_URL_S3"].replace(
                str(proxy.port), str(proxy.target[1]))}, [*pretrain, "data.train_shards=s3://no-such-bucket/x"],
             ["bucket 'no-such-bucket' does not exist"]),
            ("wrong credentials", {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{auth_port}", "AWS_ACCESS_KEY_ID": "wrong"},
             [*pretrain, f"data.train_shards=s3://{bucket}/x"], ["access denied", "AWS_ACCESS_KEY_ID"]),
            ("make-shards to a missing bucket", {"AWS_ENDPOINT_URL_S3": os.environ["AWS_ENDPOINT_URL_S3"].replace(
                str(proxy.port), str(proxy.target[1]))},
             ["make-shards", "--num-samples", "8", "--out", "s3://no-such-bucket/set", "--quiet"],
             ["does not exist", "no-such-bucket"]),
            ("no credentials at all", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                       "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true",
                                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")},
             [*pretrain, f"data.train_shards={shards}"], ["no AWS credentials found", f"{shards}/manifest.json"]),
        ]
        for what, extra, args, words in cases:
            run_env = {k: v for k, v in {**env, **extra}.items() if v is not None}  # None: unset
            run, seconds = _cli(args, run_env, tmp_path)
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 1 and len(lines) == 1, (what, run.stderr[-3000:])
            assert all(w in lines[0] for w in words), (what, lines[0])
            assert seconds < 60, (what, seconds)  # bounded by HNCL_S3_DEADLINE=6, not a hang
    finally:
        proxy.mode = "pass"
        moto_auth.kill()
    assert leftovers(tmp_path) == []


# --- credentials as real clusters have them ---------------------------------------------------
def _signed_with(proxy):
    """(access key ids, security tokens) of the requests the proxy saw."""
    keys, tokens = set(), set()
    for head in proxy.requests:
        key = re.search(r"Credential=([^/]+)/", head)
        token = re.search(r"\r\nx-amz-security-token: ([^\r]+)", head, re.I)
        keys |= {key.group(1)} if key else set()
        tokens |= {token.group(1).strip()} if token else set()
    return keys, tokens


PORTABLE = """
import pickle, sys
fs = pickle.load(open(sys.argv[1], "rb"))
fs.pipe_file(sys.argv[2], b"from another process")
"""


def test_session_tokens_and_profiles_sign_every_request_here_and_in_another_process(faulty_s3, tmp_path,
                                                                                  monkeypatch):
    """Temporary credentials (STS, SSO, an assumed role) carry a session token that must go with
    every request; a profile in the shared credentials file must be found; and the filesystem Ray's
    controller unpickles (in a process without the driver's AWS variables) must carry them."""
    import pickle

    from hncl.infra.raycluster import worker_env

    proxy, bucket = faulty_s3
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-of-an-assumed-role")
    storage.write_bytes(f"s3://{bucket}/sts/a", b"a")
    assert storage.read_bytes(f"s3://{bucket}/sts/a") == b"a"
    assert _signed_with(proxy) == ({"testing"}, {"token-of-an-assumed-role"})

    with open(tmp_path / "pickled-fs", "wb") as f:
        pickle.dump(storage.portable_s3_filesystem(f"s3://{bucket}/runs"), f)
    proxy.requests.clear()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "no-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"))
    done = subprocess.run([sys.executable, "-c", PORTABLE, str(tmp_path / "pickled-fs"), f"{bucket}/sts/b"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _signed_with(proxy) == ({"testing"}, {"token-of-an-assumed-role"})

    (tmp_path / "credentials").write_text("[research]\naws_access_key_id = AKIARESEARCH\n"
                                          "aws_secret_access_key = research-secret\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "research")
    proxy.requests.clear()
    storage.write_bytes(f"s3://{bucket}/profile/a", b"p")
    assert _signed_with(proxy) == ({"AKIARESEARCH"}, set())
    assert {"AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"} <= set(worker_env())  # workers find the same

    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.MissingCredentials) as err:  # the profile is not on this host
        storage.read_bytes(f"s3://{bucket}/profile/a")
    assert "'research'" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(storage.MissingCredentials) as err:  # none at all: one line, not botocore's traceback
        storage.read_bytes(f"s3://{bucket}/profile/a")
    assert "no AWS credentials found" in str(err.value) and f"s3://{bucket}/profile/a" in str(err.value)


# --- slow readers, stalled bodies, lost answers --------------------------------------------------
def test_reads_whose_body_stalls_after_the_headers_are_retried_until_the_deadline(faulty_s3, monkeypatch,
                                                                                  caplog, tmp_path):
    """The headers arrive, then the body stops: a read timeout after the call (aiobotocore's, a
    TimeoutError too) is a transient failure retried until HNCL_S3_DEADLINE, for a whole object
    (checkpoints, manifests), a download and a shard's ranged reads alike."""
    proxy, bucket = faulty_s3
    monkeypatch.setenv("HNCL_S3_READ_TIMEOUT", "1")
    payload = os.urandom(100_000)
    storage.write_bytes(f"s3://{bucket}/body/object", payload)
    proxy.cut_after = 2000  # the headers and the start of the body
    with caplog.at_level(logging.INFO, logger="hncl.infra.s3"):
        with proxy.outage(2.5, "stall"):
            time.sleep(0.1)
            assert storage.read_bytes(f"s3://{bucket}/body/object") == payload
        with proxy.outage(2.5, "stall"):
            time.sleep(0.1)
            storage.get_dir(f"s3://{bucket}/body", str(tmp_path / "got"))
    assert (tmp_path / "got" / "object").read_bytes() == payload
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any("(range)" in m for m in retried) and any("(download)" in m for m in retried)


def test_a_shard_cut_long_after_it_was_opened_is_reopened_not_lost(faulty_s3, monkeypatch):
    """A reader advances as fast as training consumes: its next block is fetched long after the
    shard was opened. A cut then gets the whole HNCL_S3_DEADLINE, counted from the failure."""
    import io
    import tarfile

    from hncl.data.shards import ShardSamples, SkipCounter
    from hncl.infra.s3 import ResilientS3FileSystem

    proxy, bucket = faulty_s3
    monkeypatch.setenv("HNCL_S3_DEADLINE", "2")
    monkeypatch.setattr(ResilientS3FileSystem, "default_block_size", 32 * 1024)  # real shards: 50 MiB blocks
    payloads = [os.urandom(20_000) for _ in range(10)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, data in enumerate(payloads):
            info = tarfile.TarInfo(f"{i:06d}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = f"s3://{bucket}/late/shard-000000.tar"
    storage.write_bytes(url, buf.getvalue())

    class OneShard:
        sample_counts, root = {url: 10}, f"s3://{bucket}/late"

    counter = SkipCounter()
    reader = ShardSamples(OneShard(), counter, stall_timeout_s=600)
    got = []
    for sample in reader.read(url):
        got.append(sample["bin"])
        if len(got) == 5:  # the consumer is busy for longer than the deadline; then the network cuts out
            time.sleep(2.5)
            proxy.cut_after, proxy.mode = 1000, "cut"
            threading.Timer(0.8, lambda: setattr(proxy, "mode", "pass")).start()
    assert got == payloads and counter.take() == {}


def _s3_error(status: str, code: str) -> bytes:
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code}</Message></Error>'.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


def test_a_multipart_completion_whose_answer_was_lost_is_a_success(faulty_s3, tmp_path, caplog):
    """Uploads of 2 chunks or more are multipart. S3 completes the upload, the answer is lost, and
    S3 answers the retried completion "NoSuchUpload" (the upload is done: moto answers 200, so the
    proxy answers as S3 does): the object in place is checked to be this upload (its ETag is the
    MD5 of the parts' MD5s), so the upload succeeds. Another object at the key fails it."""
    proxy, bucket = faulty_s3
    payload = os.urandom(10 * 2**20 + 1)  # chunks of 5 MiB: 3 parts
    local = tmp_path / "big.bin"
    local.write_bytes(payload)
    fs = storage.s3_filesystem()
    completion = r"POST /\S+\?uploadId="
    proxy.lose_answer_to, proxy.answer_next = completion, (completion, _s3_error("404 Not Found", "NoSuchUpload"))
    with caplog.at_level(logging.INFO, logger="hncl.infra.s3"):
        fs.put_file(str(local), f"{bucket}/big/object.bin", chunksize=5 * 2**20)
    assert proxy.lose_answer_to is None and proxy.answer_next is None  # both faults were met
    assert storage.read_bytes(f"s3://{bucket}/big/object.bin") == payload
    assert any("its answer was lost, the object is in place" in r.getMessage() for r in caplog.records)

    fs.pipe_file(f"{bucket}/big/other.bin", b"not this upload")  # the upload gone, something else there
    proxy.answer_next = (completion, _s3_error("404 Not Found", "NoSuchUpload"))
    with pytest.raises(Exception) as err:
        fs.put_file(str(local), f"{bucket}/big/other.bin", chunksize=5 * 2**20)
    assert "NoSuchUpload" in repr(err.value) + repr(err.value.__cause__) + repr(err.value.__context__)
    assert storage.read_bytes(f"s3://{bucket}/big/other.bin") == b"not this upload"
