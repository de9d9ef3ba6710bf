"""Synthetic faces: deterministic, anatomically ordered, expressions follow their action units,
identities independent of expression and disjoint across splits."""

import numpy as np
import pytest
from PIL import Image

from hncl.data.synthetic import EXPRESSIONS, SyntheticFaces, contact_sheet, expression_controls, face_landmarks, make_identity


def test_deterministic_for_a_seed():
    a, b, c = (SyntheticFaces(3, 4, size=112, seed=s)[5] for s in (7, 7, 8))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.landmarks, b.landmarks)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (112, 112, 3) and a.image.dtype == np.uint8


def test_landmarks_inside_and_in_anatomical_order():
    ds = SyntheticFaces(10, 7, size=128, seed=1)
    for face in ds:
        p = face.landmarks
        assert p.shape == (68, 2) and (p > 0).all() and (p < 128).all()
        y = lambda idx: p[list(idx), 1].mean()  # noqa: E731
        assert y(range(17, 27)) < y(range(36, 48)) < p[30, 1] < y(range(48, 68)) < p[8, 1]  # brows>eyes>nose>mouth>chin
        assert p[0, 0] < p[8, 0] < p[16, 0]  # jaw runs image-left to image-right
        assert p[36, 0] < p[39, 0] < p[42, 0] < p[45, 0]  # right eye (image left), then left eye
        assert p[17, 0] < p[21, 0] < p[22, 0] < p[26, 0]
        assert p[48, 0] < p[51, 0] < p[54, 0] and p[31, 0] < p[33, 0] < p[35, 0]
        assert p[27, 1] < p[28, 1] < p[29, 1] < p[30, 1]  # nose bridge runs down


def _geom(label, intensity=1.0, seed=3):
    p = face_landmarks(make_identity(np.random.default_rng(seed), 0), expression_controls(label, intensity))
    eye_y = p[36:48, 1].mean()
    return {
        "brow_lift": eye_y - p[17:27, 1].mean(),  # larger = brows higher
        "inner_brow_lift": eye_y - p[[21, 22], 1].mean(),
        "brow_gap": p[22, 0] - p[21, 0],
        "eye_open": (p[[40, 41, 46, 47], 1].mean() - p[[37, 38, 43, 44], 1].mean()),
        "corner_lift": p[[62, 66], 1].mean() - p[[48, 54], 1].mean(),  # corners above the mouth centre
        "mouth_open": p[66, 1] - p[62, 1],
        "mouth_width": p[54, 0] - p[48, 0],
        "upper_lip_to_nose": p[51, 1] - p[33, 1],
        "lip_thickness": (p[57, 1] - p[51, 1]) - (p[66, 1] - p[62, 1]),
    }


@pytest.mark.parametrize("seed", [3, 11])
def test_expressions_move_the_geometry_their_action_units_say(seed):
    n = _geom(0, seed=seed)
    e = {name: _geom(i, seed=seed) for i, name in enumerate(EXPRESSIONS)}
    assert e["happy"]["corner_lift"] > n["corner_lift"] + 0.02  # AU12 lip corner puller
    assert e["happy"]["eye_open"] < n["eye_open"]  # AU6 cheek raiser pushes the lower lid up
    assert e["sad"]["corner_lift"] < n["corner_lift"] - 0.02  # AU15 lip corner depressor
    assert e["sad"]["inner_brow_lift"] > n["inner_brow_lift"]  # AU1 inner brow raiser
    assert e["surprise"]["brow_lift"] > n["brow_lift"] + 0.02  # AU1+2
    assert e["surprise"]["eye_open"] > n["eye_open"] * 1.3  # AU5 upper lid raiser
    assert e["surprise"]["mouth_open"] > 0.05 > n["mouth_open"]  # AU26 jaw drop
    assert e["fear"]["mouth_width"] > n["mouth_width"]  # AU20 lip stretcher
    assert e["fear"]["brow_gap"] < n["brow_gap"] and e["fear"]["brow_lift"] > n["brow_lift"]  # AU1+2+4
    assert e["disgust"]["upper_lip_to_nose"] < n["upper_lip_to_nose"]  # AU10 upper lip raiser
    assert e["anger"]["brow_gap"] < n["brow_gap"] and e["anger"]["brow_lift"] < n["brow_lift"]  # AU4
    assert e["anger"]["lip_thickness"] < n["lip_thickness"]  # AU23/24 lips pressed
    # intensity scales the effect
    assert _geom(6, 0.5, seed)["brow_gap"] > e["anger"]["brow_gap"]


def test_identities_are_persistent_independent_of_expression_and_disjoint_across_splits():
    train, test = SyntheticFaces(12, 10, seed=0, split="train"), SyntheticFaces(12, 10, seed=0, split="test")
    tr_ids = {f.identity for f in train}
    te_ids = {f.identity for f in test}
    assert len(tr_ids) == len(te_ids) == 12 and not tr_ids & te_ids
    assert not {train.sample_id(i) for i in range(len(train))} & {test.sample_id(i) for i in range(len(test))}
    per_identity = {}
    for f in train:
        per_identity.setdefault(f.identity, set()).add(f.label)
    assert all(len(labels) >= 3 for labels in per_identity.values())  # each person, several expressions
    labels = [f.label for f in train]
    assert set(labels) == set(range(len(EXPRESSIONS)))
    # the same person keeps their look: background colour of every image of identity 0 agrees
    corners = [f.image[1, 1].astype(int) for f in train if f.identity == 0]
    assert max(np.abs(c - corners[0]).max() for c in corners) < 100


def test_contact_sheet_png(tmp_path):
    faces = [SyntheticFaces(2, 5, size=112)[i] for i in range(10)]
    contact_sheet(faces, str(tmp_path / "sheet.png"), columns=5)
    img = Image.open(tmp_path / "sheet.png")
    assert img.size[0] == 5 * 112 and img.size[1] == 2 * (112 + 14)
    # landmark dots are drawn: the sheet has pure-magenta mouth markers
    arr = np.asarray(img.convert("RGB"))
    assert ((arr == [255, 0, 255]).all(-1)).sum() > 20
