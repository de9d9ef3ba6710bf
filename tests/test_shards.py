"""make_shards and the streaming reader on real files, real processes, real Ray and real S3."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hncl.data.make_shards import MakeShardsError, ShardJob, make_shards, verify
from hncl.data.shards import ShardSet, eval_pipeline, loader, train_pipeline
from hncl.data.synthetic import SyntheticFaces

N, SHARD = 120, 30


def synthetic_job(out, n=N, seed=0):
    return ShardJob(source="synthetic", out=str(out), source_options=(("num_samples", n), ("seed", seed), ("size", 112)))


def build(out, **kw):
    kw.setdefault("descriptor_dim", 32)
    return make_shards(synthetic_job(out), shard_size=SHARD, progress=False, log=lambda *_: None, **kw)


@pytest.fixture(scope="module")
def serial_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "serial"
    build(out)
    return out


def read_all(root, batch_size=16, workers=2):
    batches = list(loader(eval_pipeline(ShardSet.open(str(root)), batch_size), num_workers=workers))
    return batches


def test_round_trip_every_sample_once_with_label_id_and_heatmap(serial_set):
    manifest = verify(str(serial_set))
    assert manifest["num_samples"] == N and manifest["num_shards"] == N // SHARD
    assert sum(manifest["class_counts"].values()) == N and manifest["skipped"] == {}
    batches = read_all(serial_set)
    ids = torch.cat([b["id"] for b in batches])
    assert len(ids) == N and len(set(ids.tolist())) == N
    faces = SyntheticFaces(-(-N // 14), 14, size=112, seed=0)
    truth = {faces.sample_id(i): faces[i].label for i in range(N)}
    labels = torch.cat([b["label"] for b in batches])
    assert all(truth[i] == l for i, l in zip(ids.tolist(), labels.tolist()))
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 112, 112)
    assert b["heatmap"].dtype == torch.uint8 and b["heatmap"].shape[1:] == (68, 16, 16)
    # each point's heatmap peaks in the cell of its (aligned) landmark
    cell = b["heatmap"].flatten(2).argmax(-1)
    lm = (b["landmarks"] * 16 / 112).floor()
    assert ((cell % 16 - lm[..., 0]).abs() <= 1).all() and ((cell // 16 - lm[..., 1]).abs() <= 1).all()
    desc = ShardSet.open(str(serial_set)).descriptor()
    assert desc.dim == 32 and desc(b["heatmap"]).shape == (len(b["id"]), 32)


def test_training_stream_is_endless_fixed_size_and_shuffled(serial_set):
    it = iter(loader(train_pipeline(ShardSet.open(str(serial_set)), batch_size=16, seed=1, loader_workers=2),
                     num_workers=2))
    batches = [next(it) for _ in range(12)]  # 192 samples from a 120-sample set: resampled
    assert all(b["id"].shape == (16,) for b in batches)
    assert len(set(torch.cat([b["id"] for b in batches]).tolist())) > 60


def test_decode_jpeg_matches_pil_and_falls_back_for_what_libjpeg_turbo_cannot_read():
    import io

    from PIL import UnidentifiedImageError

    from hncl.data.shards import decode_jpeg

    face = SyntheticFaces(1, 1, size=112, seed=3)[0].image
    for mode in ("RGB", "CMYK", "L"):  # CMYK: simplejpeg refuses RGB output -> PIL converts
        buf = io.BytesIO()
        Image.fromarray(face).convert(mode).save(buf, format="JPEG", quality=90)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            want = np.array(im.convert("RGB"))
        got = decode_jpeg(buf.getvalue())
        assert got.shape == (112, 112, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want).max() <= 1, mode
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="JPEG")
    with pytest.raises(OSError):  # truncated: an error for the skip counter, never a half-grey face
        decode_jpeg(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UnidentifiedImageError):
        decode_jpeg(b"these bytes are not an image")


def test_read_npy_equals_np_load_and_rejects_bad_bytes():
    import io

    from hncl.data.shards import read_npy

    for arr in (np.arange(68 * 4 * 4, dtype=np.uint8).reshape(68, 4, 4), np.random.rand(68, 2).astype(np.float16),
                np.asfortranarray(np.random.rand(3, 5)), np.zeros((0, 3), np.float32)):
        for _ in range(2):  # the second read takes the cached-header path
            buf = io.BytesIO()
            np.save(buf, arr)
            got = read_npy(buf.getvalue())
            assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
            assert got.flags.writeable
    buf = io.BytesIO()
    np.save(buf, np.ones((68, 4, 4), np.uint8))
    for bad in (b"not an array at all", buf.getvalue()[:-10]):
        with pytest.raises(ValueError):
            read_npy(bad)


def test_batch_views_match_the_per_image_recipe_in_shape_and_statistics():
    """BatchViews (kornia, per batch) draws its own parameters per image and per view, and keeps
    the per-image recipe's output format: float [B, 3, S, S] normalised with MEAN/STD."""
    from hncl.data.augment import MEAN, STD, BatchViews, view_transform

    images = torch.stack([torch.from_numpy(SyntheticFaces(1, 1, size=112, seed=s)[0].image).permute(2, 0, 1)
                          for s in range(8)])
    torch.manual_seed(0)
    x1, x2 = BatchViews(64)(images)
    assert x1.shape == x2.shape == (8, 3, 64, 64) and x1.dtype == torch.float32
    assert not torch.allclose(x1, x2)  # two independent draws
    # identical inputs still get different crops / colours per image
    same = BatchViews(64)(images[:1].repeat(4, 1, 1, 1))[0]
    assert len({round(float(v), 4) for v in same.mean(dim=(1, 2, 3))}) == 4
    # the range a normalised [0, 1] image can take, for both paths
    lo, hi = (0 - MEAN[0]) / STD[0], (1 - MEAN[0]) / STD[0]
    per_image = view_transform(64)(images[0])
    for t in (x1, x2, per_image):
        assert float(t.min()) >= lo - 1e-4 and float(t.max()) <= hi + 1e-4


def test_training_stream_is_reproducible_for_a_seed(serial_set):
    def ids(seed):
        torch.manual_seed(0)  # the loader workers' seeds derive from the process's torch seed
        it = iter(loader(train_pipeline(ShardSet.open(str(serial_set)), batch_size=8, seed=seed, loader_workers=2),
                         num_workers=2))
        return torch.cat([next(it)["id"] for _ in range(6)]).tolist()

    assert ids(5) == ids(5)
    assert ids(5) != ids(6)


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 2)])
def test_training_stream_reads_each_sample_of_an_epoch_on_exactly_one_rank_and_worker(serial_set, world, workers):
    """The ranks' streams split every data epoch: 4 readers share the 4 shards; 6 readers split
    each shard in two by sample index. Equal batches per rank regardless (the stream goes on into
    the next epoch), and each epoch's split differs from the last."""
    ids = {}  # (rank, worker-order position) -> [(id, epoch)]
    for rank in range(world):
        it = iter(loader(train_pipeline(ShardSet.open(str(serial_set)), batch_size=8, seed=1, rank=rank,
                                        world=world, shuffle_buffer=20, loader_workers=workers), num_workers=workers))
        for n in range(24):  # the DataLoader takes batches from its workers in turn
            b = next(it)
            ids.setdefault((rank, n % workers), []).extend(zip(b["id"].tolist(), b["epoch"].tolist()))
    everything = sorted(torch.cat([b["id"] for b in read_all(serial_set)]).tolist())
    for epoch in (0, 1):
        readers = [[i for i, e in got if e == epoch] for got in ids.values()]
        assert sorted(i for r in readers for i in r) == everything, epoch  # each sample once per epoch
    shares = [{i for i, e in got if e == epoch} for got in ids.values() for epoch in (0, 1)]
    assert shares[0::2] != shares[1::2]  # readers get other shards in the next epoch


def _shard_hashes(root):
    return [s["sha256"] for s in verify(str(root))["shards"]]


def test_parallel_and_ray_output_equal_serial_bytes(serial_set, tmp_path, ray_local):
    build(tmp_path / "procs", workers=2)
    build(tmp_path / "ray", ray_address="local")
    assert _shard_hashes(tmp_path / "procs") == _shard_hashes(serial_set)
    assert _shard_hashes(tmp_path / "ray") == _shard_hashes(serial_set)


def test_sigkill_then_rerun_completes_without_gaps_or_duplicates(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hncl.cli", "make-shards", "--source", "synthetic", "--num-samples", "600",
           "--shard-size", "20", "--out", str(out), "--descriptor-dim", "32", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".shard-000003.tar.json").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: nothing was tested"
    done_before = len([n for n in os.listdir(out) if n.endswith(".tar.json")])
    assert 4 <= done_before < 30
    # a half-written temporary as a kill mid-shard would leave
    (out / "shard-000029.tar.abc123.part").write_bytes(b"partial")
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_before} already done" in rerun.stdout
    assert re.search(r"[1-9]\d* stale temporary files removed", rerun.stdout)  # ours + the killed run's
    manifest = verify(str(out))  # sha256, counts, no duplicate ids, no temporaries
    assert manifest["num_samples"] == 600 and manifest["num_shards"] == 30
    # identical to a run that was never interrupted
    clean = tmp_path / "clean"
    subprocess.run(cmd[:-3] + ["--out", str(clean), "--descriptor-dim", "32", "--quiet"], check=True,
                   capture_output=True)
    assert _shard_hashes(out) == _shard_hashes(clean)


def _face_folder(root, n=12):
    faces = SyntheticFaces(2, 7, size=112, seed=3)
    for i in range(n):
        f = faces[i]
        path = root / ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"][f.label] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(f.image).save(path, quality=95)
    return root


def test_corrupt_input_image_is_skipped_and_counted_and_threshold_fails(tmp_path):
    src = _face_folder(tmp_path / "faces")
    (src / "happy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    job = ShardJob(source="folder", input=str(src), out=str(tmp_path / "set"), extractor="dlib",
                   extractor_options=(("detect", "never"),))
    logs = []
    manifest = make_shards(job, shard_size=5, max_skip_fraction=0.2, descriptor_dim=8, progress=False, log=logs.append)
    assert manifest["num_samples"] == 12 and manifest["skipped"] == {"unreadable image": 1}
    assert any("broken.jpg" in line for line in logs)  # the user learns where
    job2 = ShardJob(**{**job.__dict__, "out": str(tmp_path / "strict")})
    with pytest.raises(MakeShardsError, match="1 of 13 rows skipped.*unreadable image: 1"):
        make_shards(job2, shard_size=5, max_skip_fraction=0.01, descriptor_dim=8, progress=False, log=lambda *_: None)
    assert not (tmp_path / "strict" / "manifest.json").exists()  # incomplete sets have no manifest


def test_truncated_shard_is_skipped_and_counted_by_the_reader(serial_set, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(serial_set, broken)
    shard = broken / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    batches = read_all(broken, workers=0)
    n = sum(len(b["id"]) for b in batches)
    skipped = {}
    for b in batches:
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert N - SHARD <= n < N  # the other shards and the intact part of the broken one
    # counted in samples: every sample of the set is either delivered or counted as lost
    assert n + sum(skipped.values()) == N and skipped.get("truncated or unreadable shard", 0) >= 1
    where = [p for b in batches for p in b["skipped_where"].get("truncated or unreadable shard", [])]
    assert where == ["shard-000001.tar"]


def test_write_and_stream_from_a_real_s3_endpoint(s3, serial_set):
    fs, bucket = s3
    url = f"s3://{bucket}/sets/synthetic"
    build(url)
    assert sorted(fs.ls(f"{bucket}/sets/synthetic", detail=False))[-1].endswith("shard-000003.tar")
    assert _shard_hashes(url) == _shard_hashes(serial_set)  # same bytes as the local set
    got = sorted(torch.cat([b["id"] for b in read_all(url)]).tolist())
    assert got == sorted(torch.cat([b["id"] for b in read_all(serial_set)]).tolist())


def test_mismatched_rerun_is_refused(serial_set, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(serial_set, out)
    os.remove(out / "manifest.json")
    with pytest.raises(MakeShardsError, match="different shard set"):
        make_shards(synthetic_job(out), shard_size=SHARD + 1, progress=False, log=lambda *_: None)


def test_dlib_default_skips_photos_without_a_face_and_counts_group_photos(tmp_path):
    from photos import write_photos

    files = write_photos(str(tmp_path / "src" / "happy"))
    job = ShardJob(source="folder", input=str(tmp_path / "src"), out=str(tmp_path / "set"), extractor="dlib")
    logs = []
    manifest = make_shards(job, shard_size=4, max_skip_fraction=1.0, descriptor_dim=2, progress=False,
                           log=logs.append)
    no_face = sorted(n for n, (_, faces) in files.items() if faces == 0)
    assert manifest["num_samples"] == len(files) - len(no_face) == 2
    assert manifest["skipped"] == {"no face detected": len(no_face)}
    assert manifest["noted"] == {"several faces (kept the largest)": 1}
    text = "\n".join(logs)
    assert all(f"{n}.jpg" in text for n in no_face[:5]) and "two_people.jpg" in text  # where, not just how many
    # the old behaviour is still there on request, and no longer silent
    job = ShardJob(**{**job.__dict__, "out": str(tmp_path / "whole"), "extractor_options": (("detect", "auto"),)})
    manifest = make_shards(job, shard_size=4, descriptor_dim=2, progress=False, log=lambda *_: None)
    assert manifest["num_samples"] == len(files) and manifest["skipped"] == {}
    assert manifest["noted"]["no face detected: whole image used"] == len(no_face)


def test_a_stream_restarted_at_a_saved_position_continues_exactly_and_decodes_nothing_twice(serial_set, monkeypatch):
    """What a checkpoint saves of the stream: where each reader is after the batches trained on.
    A stream started there gives exactly the batches (samples, order and augmented views) the
    uninterrupted stream gave next; getting there decodes no sample trained on before."""
    from hncl.data import shards as shards_module
    from hncl.data.augment import view_transform
    from hncl.data.epoch_plan import StreamState

    shard_set = ShardSet.open(str(serial_set))

    def stream(state, workers):
        pipe = train_pipeline(shard_set, batch_size=8, seed=4, view_transform=view_transform(32), stream=state)
        return iter(loader(pipe, num_workers=workers))

    def position(state, batches):
        state = StreamState.from_json(state.to_json())
        for b in batches:
            reader, epoch, emitted = b["stream"]
            state.positions[reader] = (epoch, emitted)
            state.turn = (reader + 1) % state.readers
        return state

    start = StreamState.start(shard_set.counts, seed=4, readers=2, block=30)
    it = stream(start, 2)
    whole = [next(it) for _ in range(24)]  # 192 samples: into the second epoch
    for cut in (7, 16):
        it = stream(position(start, whole[:cut]), 2)
        for b in whole[cut:]:
            again = next(it)
            assert again["id"].tolist() == b["id"].tolist() and again["epoch"].tolist() == b["epoch"].tolist()
            assert torch.equal(again["x1"], b["x1"]) and torch.equal(again["x2"], b["x2"])

    decoded = []
    real = shards_module.decode_sample
    monkeypatch.setattr(shards_module, "decode_sample", lambda s, r=None: decoded.append(1) or real(s, r))
    one = StreamState.start(shard_set.counts, seed=4, readers=1, block=30)
    one.positions = [(0, 70)]  # 70 of the epoch's 120 samples trained on
    it = stream(one, 0)
    first = [next(it) for _ in range(3)]
    # 3 batches of 8, and the one sample webdataset's batcher takes before it hands a batch out
    assert len(decoded) == 3 * 8 + 1 and all(b["stream"][2] > 70 for b in first)


def test_a_set_with_fewer_samples_than_readers_streams_on_every_reader(tmp_path):
    """3 samples, 8 readers (8 ranks, no loader workers): most shares of an epoch are empty,
    which is not a failure; every reader gets its turn, each epoch's samples once."""
    make_shards(synthetic_job(tmp_path / "tiny", n=3), shard_size=2, descriptor_dim=8, progress=False,
                log=lambda *_: None)
    tiny = ShardSet.open(str(tmp_path / "tiny"))
    got = {}
    for rank in range(8):
        it = iter(train_pipeline(tiny, batch_size=1, seed=0, rank=rank, world=8))
        got[rank] = [(int(b["id"][0]), int(b["epoch"][0])) for b in (next(it) for _ in range(3))]
    everything = sorted(torch.cat([b["id"] for b in read_all(tmp_path / "tiny")]).tolist())
    passed = min(pairs[-1][1] for pairs in got.values())  # every reader is past the epochs before this
    assert passed >= 2
    for epoch in range(passed):
        assert sorted(i for pairs in got.values() for i, e in pairs if e == epoch) == everything, epoch


def test_time_the_consumer_spends_training_is_not_a_stall(serial_set, tmp_path):
    """data.stall_timeout_s counts how long a reader waits for data, not how long training took
    between two samples: a pause (a long checkpoint) longer than the timeout, then one missing
    shard, is one missing shard; shards failing for longer than the timeout is a stall."""
    from hncl.data.shards import DataStall, ShardSamples, SkipCounter

    holes = tmp_path / "holes"
    shutil.copytree(serial_set, holes)
    os.remove(holes / "shard-000001.tar")
    shards = ShardSet.open(str(holes))
    counter = SkipCounter()
    reader = ShardSamples(shards, counter, stall_timeout_s=0.5)
    urls = sorted(shards.sample_counts)
    got = [s["__key__"] for s in reader.read(urls[0])]
    time.sleep(0.8)  # the consumer is busy with what it got
    assert list(reader.read(urls[1])) == [] and counter.take() == {"missing shard": SHARD}
    assert len(got) == SHARD and len(list(reader.read(urls[2]))) == SHARD

    slow = ShardSamples(shards, SkipCounter(), stall_timeout_s=0.5)
    with pytest.raises(DataStall, match="no sample arrived"):
        for _ in range(3):  # waiting on failing shards (here: a slow endpoint) for longer than the timeout
            list(slow.read(urls[1]))
            time.sleep(0.3)
