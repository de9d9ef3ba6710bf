"""Heatmap descriptor: fit/save/load, device application vs a NumPy reference, and the premise
of the method: heatmap neighbours share expression across identities."""

import io

import numpy as np
import pytest
import torch

from hncl.data.synthetic import SyntheticFaces
from hncl.heatmaps.align import align_faces
from hncl.heatmaps.descriptor import HeatmapDescriptor
from hncl.heatmaps.render import INNER_POINTS, pool_heatmaps, render_heatmaps


def _pooled(split, n_ids, per_id=7, seed=0, resolution=16):
    faces = list(SyntheticFaces(n_ids, per_id, size=112, seed=seed, split=split))
    imgs, pts = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
    _, apts, _ = align_faces(imgs, pts, 112)
    pooled = pool_heatmaps(render_heatmaps(torch.from_numpy(apts), 112), resolution)
    return pooled, torch.tensor([f.label for f in faces]), imgs


@pytest.fixture(scope="module")
def sets():
    return _pooled("train", 30), _pooled("test", 20)


def test_projection_equals_numpy_reference_and_roundtrips(sets, tmp_path):
    (train, _, _), (test, _, _) = sets
    desc = HeatmapDescriptor.fit(train, dim=32, inner_only=True)
    comp = desc.components.numpy().astype(np.float64)
    assert np.allclose(comp.T @ comp, np.eye(32), atol=1e-5)  # orthonormal PCA axes
    x = test.numpy().astype(np.float64)[:, list(INNER_POINTS)].reshape(len(test), -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (x - desc.mean.numpy()) @ comp
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    assert np.allclose(desc(test).numpy(), y, atol=1e-5)
    desc.save(str(tmp_path / "descriptor.npz"))
    again = HeatmapDescriptor.load(str(tmp_path / "descriptor.npz"))
    assert torch.equal(again(test), desc(test)) and again.spec() == desc.spec()
    assert torch.equal(HeatmapDescriptor.load(io.BytesIO(desc.to_bytes()))(test), desc(test))
    # deterministic fit, including component signs
    assert torch.equal(HeatmapDescriptor.fit(train, dim=32).components, desc.components)


def test_errors_name_the_problem(sets):
    (train, _, _), _ = sets
    with pytest.raises(ValueError, match="needs at least 5000"):
        HeatmapDescriptor.fit(train, dim=5000)
    desc = HeatmapDescriptor.fit(train, dim=8)
    with pytest.raises(ValueError, match="fitted on 16x16"):
        desc(pool_heatmaps(render_heatmaps(torch.rand(2, 68, 2) * 100, 112), 8))


def _purity(feats, labels):
    x = torch.nn.functional.normalize(feats.float().flatten(1), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return float((labels[sim.argmax(1)] == labels).float().mean())


def test_heatmap_neighbours_share_expression_across_held_out_identities(sets):
    (train, _, _), (test, labels, imgs) = sets
    desc = HeatmapDescriptor.fit(train, dim=64, inner_only=True)
    heat = _purity(desc(test), labels)
    pixels = _purity(torch.from_numpy(imgs).float(), labels)
    full = _purity(HeatmapDescriptor.fit(train, dim=64, inner_only=False)(test), labels)
    assert heat > 0.8  # chance is ~1/7
    assert heat > pixels + 0.4  # raw pixels find the same person, not the same expression
    assert heat > full  # the jaw line carries face shape (identity): dropping it helps
