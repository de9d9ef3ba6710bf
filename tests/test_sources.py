"""Each source adapter reads its official layout and maps its labels to the canonical order."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from hncl.data.sources import CLASSES, open_source


def _img(path, value=128, size=(40, 40)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _label(item):
    return None if item.label is None else CLASSES[item.label]


def test_folder_and_unlabeled(tmp_path):
    for cls, n in (("Happy", 2), ("angry", 1), ("surprised", 1)):
        for i in range(n):
            _img(str(tmp_path / "f" / cls / f"{i}.jpg"))
    src = open_source("folder", str(tmp_path / "f"))
    assert sorted(_label(src.item(i)) for i in range(len(src))) == ["anger", "happy", "happy", "surprise"]
    again = open_source("folder", str(tmp_path / "f"))
    assert [src.item(i).sample_id for i in range(4)] == [again.item(i).sample_id for i in range(4)]
    _img(str(tmp_path / "f" / "bored" / "x.jpg"))
    with pytest.raises(ValueError, match="bored"):
        open_source("folder", str(tmp_path / "f"))
    _img(str(tmp_path / "u" / "a" / "b" / "1.png"))
    _img(str(tmp_path / "u" / "2.jpg"))
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    un = open_source("unlabeled", str(tmp_path / "u"))
    assert len(un) == 2 and un.item(0).label is None


def test_rafdb_basic_layout_and_label_order(tmp_path):
    root = tmp_path / "RAF-DB"
    lines = [f"train_{i:05d}.jpg {code}" for i, code in enumerate(range(1, 8), 1)] + ["test_00001.jpg 4"]
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        stem = line.split()[0][:-4]
        _img(str(root / "Image" / "aligned" / f"{stem}_aligned.jpg"))
    train = open_source("rafdb", str(root), "train")
    # RAF-DB codes 1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral
    assert [_label(train.item(i)) for i in range(7)] == ["surprise", "fear", "disgust", "happy", "sad", "anger",
                                                         "neutral"]
    assert train.excluded == {"other split": 1}
    test = open_source("rafdb", str(root), "test")
    assert len(test) == 1 and _label(test.item(0)) == "happy"
    assert test.item(0).meta["source"] == os.path.join("Image", "aligned", "test_00001_aligned.jpg")


def test_affectnet_csv_crop_landmarks_and_classes(tmp_path):
    root = tmp_path / "AffectNet"
    pts = np.arange(136, dtype=float).reshape(68, 2) % 90 + 5
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]
    rows = []
    for code in range(11):
        rel = f"1/img{code}.jpg"
        _img(str(root / "Manually_Annotated_Images" / rel), size=(100, 100))
        rows.append([rel, 10, 12, 70, 80, ";".join(f"{v:.2f}" for v in pts.flatten()), code, 0.1, 0.2])
    with open(root / "training.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    seven = open_source("affectnet", str(root), "train")
    assert [_label(seven.item(i)) for i in range(len(seven))] == list(CLASSES[:7])
    assert seven.excluded == {"contempt (7-class)": 1, "not an expression (codes 8-10)": 3}
    eight = open_source("affectnet", str(root), "train", num_classes=8)
    assert _label(eight.item(7)) == "contempt" and len(eight) == 8
    item = seven.item(0)
    assert item.box == (10.0, 12.0, 70.0, 80.0)
    assert np.allclose(item.landmarks, pts + 0.5, atol=1e-4)  # pixel index -> corner-origin coordinates


def _fer_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        w.writerows(rows)


def test_fer2013_and_ferplus_majority_vote(tmp_path):
    px = " ".join(["7"] * 2304)
    usage = ["Training"] * 7 + ["PublicTest", "PrivateTest"]
    _fer_csv(tmp_path / "fer2013.csv", [[e, px, u] for e, u in zip(list(range(7)) + [3, 4], usage)])
    fer = open_source("fer2013", str(tmp_path), "train")
    # FER2013 codes 0..6 = angry, disgust, fear, happy, sad, surprise, neutral
    assert [_label(fer.item(i)) for i in range(7)] == ["anger", "disgust", "fear", "happy", "sad", "surprise",
                                                       "neutral"]
    assert fer.item(0).image.shape == (48, 48, 3) and fer.item(0).image[0, 0, 0] == 7
    assert _label(open_source("fer2013", str(tmp_path), "test").item(0)) == "sad"
    cols = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
            "contempt", "unknown", "NF"]
    votes = [[0, 0, 8, 1, 0, 0, 0, 1, 0, 0],  # surprise
             [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],  # tie: excluded
             [0, 0, 0, 0, 0, 0, 0, 0, 6, 4],  # unknown majority: excluded
             [1, 0, 0, 0, 0, 0, 0, 9, 0, 0],  # contempt
             [0, 0, 0, 0, 7, 3, 0, 0, 0, 0],  # anger
             [0, 0, 0, 6, 0, 0, 4, 0, 0, 0],  # sad
             [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],  # not a face
             [0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    with open(tmp_path / "fer2013new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([[u, f"fer{i:07d}.png", *v] for i, (u, v) in enumerate(zip(usage, votes))])
    plus = open_source("ferplus", str(tmp_path), "train")
    assert [_label(plus.item(i)) for i in range(len(plus))] == ["surprise", "contempt", "anger", "sad"]
    assert plus.excluded == {"tied vote": 1, "majority unknown or not a face": 2, "other split": 2}
    seven = open_source("ferplus", str(tmp_path), "train", num_classes=7)
    assert "contempt" not in [_label(seven.item(i)) for i in range(len(seven))]
