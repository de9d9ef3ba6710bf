"""Shard format v2 (one member per sample) against v1 (four): same samples, same stream, the
conversion, corrupt v2 members and the format check. Real tars, real processes, real S3."""

import io
import json
import os
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch

from hncl.cli import main
from hncl.data.convert_shards import convert_shards
from hncl.data.make_shards import MakeShardsError, ShardJob, make_shards, verify
from hncl.data.shard_format import (HEADER_SIZE, CorruptSample, ShardFormatError, decode_v2, encode_v2,
                                    pack_heatmap, unpack_heatmap)
from hncl.data.augment import view_transform
from hncl.data.shards import ShardSet, decode_sample, eval_pipeline, loader, train_pipeline

N, SHARD = 120, 30
KEYS = ("image", "heatmap", "landmarks", "label", "id")


def job(out, version, n=N):
    return ShardJob(source="synthetic", out=str(out), format_version=version,
                    source_options=(("num_samples", n), ("seed", 0), ("size", 112)))


def build(out, version, **kw):
    return make_shards(job(out, version), shard_size=SHARD, descriptor_dim=32, progress=False, log=lambda *_: None,
                       **kw)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    build(root / "v1", 1)
    build(root / "v2", 2)
    return root


def members(shard):
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_tar(path, items):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def skipped_of(batches):
    total = {}
    for b in batches:
        for k, v in b["skipped"].items():
            total[k] = total.get(k, 0) + v
    return total


def assert_same_batches(a, b, keys=KEYS):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        for k in keys:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


# --- the encoding ------------------------------------------------------------------------------
def test_sparse_heatmap_and_v2_container_round_trip_exactly():
    rng = np.random.default_rng(0)
    cases = [np.zeros((68, 16, 16), np.uint8), np.full((68, 16, 16), 255, np.uint8),
             rng.integers(0, 256, (68, 64, 64), dtype=np.uint8)]
    for _ in range(50):  # random boxes with zeros inside them, empty points, edge boxes
        h = np.zeros((68, 16, 16), np.uint8)
        for p in range(68):
            if rng.random() < 0.3:
                continue
            y0, x0 = rng.integers(0, 16, 2)
            y1, x1 = rng.integers(y0 + 1, 17), rng.integers(x0 + 1, 17)
            h[p, y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0)) * (rng.random((y1 - y0, x1 - x0)) < 0.7)
        cases.append(h)
    for h in cases:
        packed = pack_heatmap(h)
        got = unpack_heatmap(memoryview(packed), h.shape[0], h.shape[1])
        assert got.dtype == np.uint8 and np.array_equal(got, h)
        lm = (rng.random((68, 2)) * 112).astype(np.float16)
        for landmarks in (lm, None):
            s = decode_v2(encode_v2(b"\xff\xd8jpeg", b'{"id": 1}', landmarks, h), resolution=h.shape[1])
            assert s.jpeg == b"\xff\xd8jpeg" and s.meta_json == b'{"id": 1}' and np.array_equal(s.heatmap, h)
            assert (s.landmarks is None) if landmarks is None else (s.landmarks.dtype == np.float16
                                                                   and s.landmarks.tobytes() == lm.tobytes())


def test_v2_sample_is_one_member_and_far_smaller(sets):
    v1, v2 = members(sets / "v1" / "shard-000000.tar"), members(sets / "v2" / "shard-000000.tar")
    assert len(v1) == 4 * SHARD and len(v2) == SHARD
    assert [n.split(".", 1)[0] for n, _ in v2] == [n.split(".", 1)[0] for n, _ in v1[::4]]  # same keys, same order
    assert all(n.endswith(".hncl") for n, _ in v2)
    jpeg = sum(len(d) for n, d in v1 if n.endswith(".jpg"))
    # v1 is ~6x its JPEGs; v2 ~1.5x (with this small shard's end-of-archive padding spread over 30 samples)
    assert os.path.getsize(sets / "v1" / "shard-000000.tar") > 5 * jpeg
    assert os.path.getsize(sets / "v2" / "shard-000000.tar") < 1.6 * jpeg
    assert ShardSet.open(str(sets / "v1")).format == "hncl-shards/1"
    assert ShardSet.open(str(sets / "v2")).format == "hncl-shards/2"


# --- v1 and v2 give the same samples, the same stream, the same descriptor -----------------------
def test_v1_and_v2_sets_decode_to_identical_samples_and_descriptor(sets):
    for version in ("v1", "v2"):
        assert verify(str(sets / version))["num_samples"] == N
    for name in ("shard-000000.tar", "shard-000003.tar"):
        a = [decode_sample({"__key__": k, **s}, 16) for k, s in _grouped(members(sets / "v1" / name))]
        b = [decode_sample({"__key__": k, **s}, 16) for k, s in _grouped(members(sets / "v2" / name))]
        assert len(a) == len(b) == SHARD
        for x, y in zip(a, b):
            for k in KEYS:
                assert x[k] == y[k] if k in ("label", "id") else torch.equal(x[k], y[k]), k
    read = lambda v: list(loader(eval_pipeline(ShardSet.open(str(sets / v)), 16), num_workers=2))  # noqa: E731
    assert_same_batches(read("v1"), read("v2"))
    # the descriptor is fitted on the same heatmaps: the same bytes
    assert (sets / "v1" / "descriptor.npz").read_bytes() == (sets / "v2" / "descriptor.npz").read_bytes()


def test_training_stream_for_a_seed_is_identical_in_v1_and_v2(sets):
    """What the demo trains on: resampled shards, shuffle buffer, two augmented views per face,
    two loader workers. The same seed gives the same batches from either format."""
    def stream(version):
        pipe = train_pipeline(ShardSet.open(str(sets / version)), batch_size=16, seed=3, shuffle_buffer=50,
                              view_transform=view_transform(32), loader_workers=2)
        it = iter(loader(pipe, num_workers=2))
        return [next(it) for _ in range(10)]  # 160 samples of a 120-sample set: resampled

    assert_same_batches(stream("v1"), stream("v2"), keys=("x1", "x2", "heatmap", "landmarks", "label", "id"))


def _grouped(items):
    out = {}
    for name, data in items:
        key, ext = name.split(".", 1)
        out.setdefault(key, {})[ext] = data
    return list(out.items())


# --- conversion ----------------------------------------------------------------------------------
def test_convert_v1_to_v2_writes_the_bytes_make_shards_writes_and_resumes(sets, tmp_path):
    out = tmp_path / "converted"
    manifest = convert_shards(str(sets / "v1"), str(out), progress=False, log=lambda *_: None)
    direct = verify(str(sets / "v2"))
    assert verify(str(out))["format"] == "hncl-shards/2"
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in direct["shards"]]
    assert (out / "descriptor.npz").read_bytes() == (sets / "v1" / "descriptor.npz").read_bytes()
    assert manifest["converted_from"]["format"] == "hncl-shards/1"
    assert {k: manifest[k] for k in ("num_samples", "class_counts", "descriptor", "heatmap_resolution")} == \
        {k: direct[k] for k in ("num_samples", "class_counts", "descriptor", "heatmap_resolution")}
    # interrupted: a shard lost with its sidecar, a half-written temporary left behind, no manifest
    for name in ("shard-000002.tar", ".shard-000002.tar.json", "manifest.json"):
        os.remove(out / name)
    (out / "shard-000002.tar.abc123.part").write_bytes(b"partial")
    logs = []
    again = convert_shards(str(sets / "v1"), str(out), progress=False, log=logs.append)
    assert "3 already done, 1 stale temporary files removed" in logs[0]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in direct["shards"]]
    verify(str(out))


def test_convert_refuses_v2_sets_its_own_source_and_damaged_shards(sets, tmp_path):
    with pytest.raises(MakeShardsError, match="already hncl-shards/2: nothing to convert"):
        convert_shards(str(sets / "v2"), str(tmp_path / "x"), progress=False, log=lambda *_: None)
    with pytest.raises(MakeShardsError, match="must differ"):
        convert_shards(str(sets / "v1"), str(sets / "v1") + "/", progress=False, log=lambda *_: None)
    damaged = tmp_path / "damaged"
    shutil.copytree(sets / "v1", damaged)
    data = bytearray((damaged / "shard-000001.tar").read_bytes())
    data[5000] ^= 0xFF
    (damaged / "shard-000001.tar").write_bytes(bytes(data))
    with pytest.raises(MakeShardsError, match="shard-000001.tar.*sha256 does not match"):
        convert_shards(str(damaged), str(tmp_path / "y"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "y" / "manifest.json").exists()


def test_convert_shards_command_writes_to_s3(sets, s3):
    fs, bucket = s3
    url = f"s3://{bucket}/sets/converted"
    assert main(["convert-shards", str(sets / "v1"), "--out", url, "--quiet"]) == 0
    assert [s["sha256"] for s in verify(url)["shards"]] == [s["sha256"] for s in verify(str(sets / "v2"))["shards"]]
    got = list(loader(eval_pipeline(ShardSet.open(url), 16), num_workers=0))
    want = list(loader(eval_pipeline(ShardSet.open(str(sets / "v1")), 16), num_workers=0))
    assert_same_batches(got, want)


def test_make_shards_refuses_to_mix_formats_in_one_set(sets, tmp_path):
    out = tmp_path / "half-v1"
    shutil.copytree(sets / "v1", out)
    os.remove(out / "manifest.json")
    os.remove(out / "shard-000003.tar")  # an interrupted v1 build, resumed with the v2 default
    with pytest.raises(MakeShardsError, match="holds hncl-shards/1 shards.*must not mix formats.*--format 1"):
        build(out, 2)
    build(out, 1)  # resumed in its own format
    assert [s["sha256"] for s in verify(str(out))["shards"]] == \
        [s["sha256"] for s in verify(str(sets / "v1"))["shards"]]


# --- corrupt v2 members ---------------------------------------------------------------------------
def _parts(data: bytes):
    """(image length, metadata length, inflated body) of a v2 sample."""
    n_img, n_meta = struct.unpack_from("<II", data, 8)
    return n_img, n_meta, zlib.decompress(data[HEADER_SIZE + n_img:])


def _rezip(data: bytes, body: bytes) -> bytes:
    n_img = struct.unpack_from("<I", data, 8)[0]
    return data[:HEADER_SIZE + n_img] + zlib.compress(body, 9)


def test_corrupt_v2_members_are_skipped_and_counted_by_reason(sets, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sets / "v2", broken)
    shard = broken / "shard-000001.tar"
    items = members(shard)
    _, n_meta, body = _parts(items[4][1])
    bad_boxes = bytearray(body)
    bad_boxes[n_meta + 4 * 68:n_meta + 4 * 68 + 4] = bytes([14, 14, 5, 5])  # a box leaving the 16 x 16 grid
    flipped = bytearray(items[1][1])
    flipped[HEADER_SIZE + _parts(items[1][1])[0] + 20] ^= 0xFF  # inside the zlib stream
    wrong_r = bytearray(items[2][1])
    wrong_r[6] = 8  # says 68 x 8 x 8; the set's heatmaps are 16 x 16
    bad_jpeg = bytearray(items[5][1])
    bad_jpeg[HEADER_SIZE + 2:HEADER_SIZE + 600] = b"\x00" * 598
    damage = {
        1: ("corrupt sample", bytes(flipped)),  # bad compressed bytes
        2: ("corrupt heatmap", bytes(wrong_r)),  # wrong shape
        3: ("corrupt sample", items[3][1][:-40]),  # truncated member
        4: ("corrupt heatmap", _rezip(items[4][1], bytes(bad_boxes))),  # boxes do not fit the grid
        5: ("corrupt image", bytes(bad_jpeg)),
        6: ("corrupt sample", b"GIF89a not a sample at all"),
        7: ("corrupt heatmap", _rezip(items[7][1], _parts(items[7][1])[2][:-7])),  # heatmap values missing
    }
    for i, (reason, data) in damage.items():
        with pytest.raises(Exception) as e:
            decode_sample({"__key__": items[i][0], "__url__": str(shard), "hncl": data}, 16)
        if reason != "corrupt image":
            assert isinstance(e.value, CorruptSample) and e.value.reason == reason, (i, e.value)
        items[i] = (items[i][0], data)
    write_tar(shard, items)
    batches = list(loader(eval_pipeline(ShardSet.open(str(broken)), 16), num_workers=0))
    ids = torch.cat([b["id"] for b in batches])
    assert len(ids) == N - len(damage) and len(set(ids.tolist())) == len(ids)
    want = {}
    for reason, _ in damage.values():
        want[reason] = want.get(reason, 0) + 1
    assert skipped_of(batches) == want  # {"corrupt sample": 3, "corrupt heatmap": 3, "corrupt image": 1}


def test_v1_heatmap_of_the_wrong_shape_is_skipped_not_a_broken_batch(sets, tmp_path):
    broken = tmp_path / "broken-v1"
    shutil.copytree(sets / "v1", broken)
    shard = broken / "shard-000000.tar"
    items = members(shard)
    buf = io.BytesIO()
    np.save(buf, np.zeros((68, 8, 8), np.uint8))
    items[1] = (items[1][0], buf.getvalue())  # sample 0's heatmap.npy
    assert items[1][0].endswith(".heatmap.npy")
    write_tar(shard, items)
    batches = list(loader(eval_pipeline(ShardSet.open(str(broken)), 16), num_workers=0))
    assert sum(len(b["id"]) for b in batches) == N - 1 and skipped_of(batches) == {"corrupt heatmap": 1}


# --- the format check ------------------------------------------------------------------------------
def test_unknown_format_is_refused_in_one_line_and_a_manifest_without_one_is_v1(sets, tmp_path, capsys):
    future = tmp_path / "future"
    shutil.copytree(sets / "v2", future)
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format": "hncl-shards/9"}))
    with pytest.raises(ShardFormatError) as e:
        ShardSet.open(str(future))
    msg = str(e.value)
    assert msg == (f"{future}: shard format 'hncl-shards/9' is not supported by this hncl (reads hncl-shards/1, "
                   f"hncl-shards/2); upgrade hncl or rebuild the set")
    with pytest.raises(ShardFormatError):
        verify(str(future))
    with pytest.raises(ShardFormatError):
        convert_shards(str(future), str(tmp_path / "x"), progress=False, log=lambda *_: None)
    # the command stops before any training, with that one line
    capsys.readouterr()
    assert main(["pretrain", "--debug", f"data.train_shards={future}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"hncl pretrain: error: {msg}"
    # sets written before the format field existed are v1
    old = tmp_path / "old"
    shutil.copytree(sets / "v1", old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["format"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert ShardSet.open(str(old)).format == "hncl-shards/1"
    assert sum(len(b["id"]) for b in loader(eval_pipeline(ShardSet.open(str(old)), 16), num_workers=0)) == N
