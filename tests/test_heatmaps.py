"""Heatmap rendering, the three extractors, and face alignment."""

import numpy as np
import pytest
import torch

from hncl.data.synthetic import SyntheticFaces
from hncl.heatmaps.align import REFERENCE_POINTS, TEMPLATE, align_faces, apply_affine, similarity_to_template, warp
from hncl.heatmaps.extractors import (FAN_FILE, DlibHeatmaps, FANHeatmaps, LandmarkHeatmaps, fan_input, fan_points,
                                      find_fan_weights, get_extractor)
from hncl.heatmaps.render import heatmap_peaks, pool_heatmaps, render_heatmaps


def test_rendered_peaks_sit_on_the_points_within_a_pixel():
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(5, 68, 2, generator=gen) * 112
    hm = render_heatmaps(pts, image_size=112)
    assert hm.shape == (5, 68, 64, 64)
    err = (heatmap_peaks(hm) - pts * 64 / 112).abs()
    assert err.max() <= 0.5 + 1e-5  # the peak pixel contains the point
    assert torch.allclose(hm.amax(dim=(-1, -2)), torch.ones(5, 68), atol=0.2)


def test_landmark_extractor_is_vectorised_and_pooling_quantises():
    faces = [SyntheticFaces(2, 3, size=128)[i] for i in range(6)]
    imgs, pts = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
    out = LandmarkHeatmaps().extract(imgs, pts)
    one = torch.cat([LandmarkHeatmaps().extract(imgs[i], pts[i:i + 1]).heatmaps for i in range(6)])
    assert torch.equal(out.heatmaps, one) and all(out.ok)
    pooled = pool_heatmaps(out.heatmaps, 16)
    assert pooled.dtype == torch.uint8 and pooled.shape == (6, 68, 16, 16)
    assert (pooled.flatten(2).max(-1).values == 255).all()
    cell = pooled.flatten(2).argmax(-1)  # pooled peak cell contains the landmark
    x, y = (pts[..., 0] * 16 / 128).astype(int), (pts[..., 1] * 16 / 128).astype(int)
    assert ((cell % 16 - torch.from_numpy(x)).abs() <= 1).all() and ((cell // 16 - torch.from_numpy(y)).abs() <= 1).all()
    with pytest.raises(ValueError, match="needs the landmarks"):
        LandmarkHeatmaps().extract(imgs)


def test_dlib_on_a_real_photo_lands_on_the_face_in_anatomical_order():
    from skimage import data

    photo = data.astronaut()  # public-domain portrait, 512 x 512
    out = DlibHeatmaps(detect="auto").extract(photo)
    assert out.ok == [True]
    p = out.landmarks[0].numpy()
    face = p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()
    assert 120 < face[0] and face[2] < 280 and 60 < face[1] and face[3] < 220  # on her face, not the suit
    y = lambda idx: p[list(idx), 1].mean()  # noqa: E731
    assert y(range(17, 27)) < y(range(36, 48)) < p[30, 1] < y(range(48, 68)) < p[8, 1]
    assert p[36, 0] < p[39, 0] < p[42, 0] < p[45, 0] and p[0, 0] < p[8, 0] < p[16, 0] and p[48, 0] < p[54, 0]
    peaks = heatmap_peaks(out.heatmaps)[0] * 512 / 64
    assert (peaks - torch.from_numpy(p)).abs().max() <= 4.0 + 1e-4  # heatmaps drawn at the points
    blank = np.full((96, 96, 3), 128, np.uint8)
    assert DlibHeatmaps(detect="always").extract(blank).reasons == ["no face detected"]


def _random_fan():
    from face_alignment.models.fan import FAN

    torch.manual_seed(0)
    return FAN(4)


def test_fan_batched_equals_one_by_one_with_real_architecture():
    ext = get_extractor("fan", network=_random_fan(), batch_size=2)
    faces = np.stack([SyntheticFaces(2, 2, size=128)[i].image for i in range(3)])
    batched = ext.extract(faces)  # chunks of 2 + 1
    assert batched.heatmaps.shape == (3, 68, 64, 64) and batched.landmarks.shape == (3, 68, 2)
    for i in range(3):
        single = ext.extract(faces[i])
        assert torch.allclose(single.heatmaps[0], batched.heatmaps[i], atol=1e-4)
        assert torch.allclose(single.landmarks[0], batched.landmarks[i], atol=1e-3)
    assert "custom-network" in ext.version


def test_fan_crop_transform_and_decoding_round_trip():
    x = fan_input([np.zeros((128, 128, 3), np.uint8), np.full((256, 256, 3), 255, np.uint8)])
    assert x.shape == (2, 3, 256, 256) and x[0].max() == 0 and x[1].min() == 1.0
    pts = torch.tensor([[[10.3, 20.7], [31.9, 40.1]]]) * 4  # in a 256 crop
    hm = render_heatmaps(pts, 256)
    decoded = fan_points(hm) * 4  # back to the 256 crop
    assert (decoded - pts).abs().max() <= 0.5 * 4  # within half a heatmap pixel


def test_fan_offline_error_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HNCL_FAN_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        FANHeatmaps(download=False)
    msg = str(err.value)
    assert FAN_FILE in msg and str(tmp_path / "hub" / "checkpoints" / FAN_FILE) in msg and "http" in msg
    # a pre-seeded TORCH_HOME is found
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(_random_fan().state_dict(), tmp_path / "hub" / "checkpoints" / FAN_FILE)
    assert find_fan_weights() == str(tmp_path / "hub" / "checkpoints" / FAN_FILE)
    assert FAN_FILE in FANHeatmaps().version


def test_warp_convention_and_alignment():
    # identity and a pure shift of 3 pixels are exact
    img = torch.rand(1, 3, 20, 20)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    assert torch.allclose(warp(img, eye, 20), img, atol=1e-5)
    shifted = warp(img, torch.tensor([[[1.0, 0, 3], [0, 1.0, 0]]]), 20)
    assert torch.allclose(shifted[..., 3:], img[..., :17], atol=1e-5)
    # aligning synthetic faces puts the reference points on the template, and the warped image
    # agrees with the warped points (a heatmap rendered on the warped points = the warped heatmap)
    faces = [SyntheticFaces(3, 2, size=112, seed=4)[i] for i in range(6)]
    imgs, pts = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
    aligned, apts, ms = align_faces(imgs, pts, 112)
    ref = apts[:, list(REFERENCE_POINTS)]
    assert np.abs(ref - TEMPLATE * 112).mean() < 2.0
    hm = render_heatmaps(torch.from_numpy(pts), 112)
    warped_hm = warp(hm, torch.from_numpy(ms), 64, src_scale=112 / 64, dst_scale=112 / 64)
    assert (heatmap_peaks(warped_hm) - heatmap_peaks(render_heatmaps(torch.from_numpy(apts), 112))).abs().max() <= 1.0
    m = similarity_to_template(pts[0], 112)
    assert np.allclose(apply_affine(pts[0], m), apts[0], atol=1e-4)
