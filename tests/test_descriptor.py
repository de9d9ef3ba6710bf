"""Heatmap descriptor: fit/save/load, device application vs a NumPy reference, and the premise
of the method: heatmap neighbours share expression across identities."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def test_whitened_descriptor_is_the_pca_at_unit_variance(sets, tmp_path):
    (train, _, _), (test, _, _) = sets
    desc = HeatmapDescriptor.fit(train, dim=32, inner_only=True)
    white = desc.whitened(8)
    # reference: the first 8 PCA coordinates divided by their standard deviation on the fitting sample
    x = train.numpy().astype(np.float64)[:, list(INNER_POINTS)].reshape(len(train), -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ desc.components.numpy().astype(np.float64)[:, :8]
    assert np.allclose(coords.var(0, ddof=1), desc.variances[:8].numpy(), rtol=1e-4)
    assert np.allclose(desc.variances.numpy(), s[:32] ** 2 / (len(x) - 1), rtol=1e-4)
    whitened_coords = (x - white.mean.numpy()) @ white.components.numpy().astype(np.float64)
    assert np.allclose(whitened_coords.var(0, ddof=1), 1.0, rtol=1e-3)
    y = whitened_coords / np.linalg.norm(whitened_coords, axis=1, keepdims=True)
    assert white.dim == 8 and np.allclose(white(train).numpy(), y, atol=1e-5)
    assert not torch.allclose(white(test), F.normalize(desc(test)[:, :8], dim=1), atol=1e-2)  # not a plain cut
    # the variances travel with the file; a file made before they were kept loads, but cannot whiten
    desc.save(str(tmp_path / "d.npz"))
    assert torch.equal(HeatmapDescriptor.load(str(tmp_path / "d.npz")).whitened(8)(test), white(test))
    old = tmp_path / "old.npz"
    np.savez(old, mean=desc.mean.numpy(), components=desc.components.numpy(), resolution=16, inner_only=True,
             format_version=1)
    legacy = HeatmapDescriptor.load(str(old))
    assert legacy.variances is None and torch.equal(legacy(test), desc(test))
    with pytest.raises(ValueError, match="keeps no component variances.*make-shards"):
        legacy.whitened(8)
    for k in (0, 33):
        with pytest.raises(ValueError, match=f"cannot whiten {k} components: the descriptor has 32"):
            desc.whitened(k)


def test_whitening_a_component_without_spread_stays_finite(sets):
    (train, _, _), _ = sets
    desc = HeatmapDescriptor.fit(train[:5], dim=5)  # 5 heatmaps span 4 directions: the 5th has no variance
    assert float(desc.variances[4]) < 1e-9 * float(desc.variances[0])
    assert torch.isfinite(desc.whitened(5)(train)).all()


def test_whitening_finds_purer_neighbours_on_realistic_faces():
    """Why descriptor.whiten exists: on faces with head pose and personal shape, the largest
    directions of heatmap variation are not expression; at unit variance the heatmap-nearest faces
    (and the soft weights HNCL's in-batch term uses) share the expression more often."""
    faces = list(SyntheticFaces(30, 14, size=112, seed=5, split="test", difficulty="realistic"))
    imgs, pts = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
    labels = torch.tensor([f.label for f in faces])
    _, apts, _ = align_faces(imgs, pts, 112)
    pooled = pool_heatmaps(render_heatmaps(torch.from_numpy(apts), 112), 16)
    desc = HeatmapDescriptor.fit(pooled, dim=64)

    def soft_purity(d):  # the share of softmax(cosine / 0.05) weight on faces of the anchor's expression
        sim = d @ d.T
        sim.fill_diagonal_(float("-inf"))
        weights = torch.softmax(sim / 0.05, dim=1)
        return float((weights * (labels[None] == labels[:, None])).sum(1).mean())

    assert soft_purity(desc.whitened(16)(pooled)) > soft_purity(desc(pooled)) + 0.03
