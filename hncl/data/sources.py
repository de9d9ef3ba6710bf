"""Dataset sources: each official layout -> (image, label, landmarks, stable id, metadata).

Labels are mapped explicitly to the project's canonical order CLASSES (the synthetic faces'
order, plus contempt for 8-class AffectNet/FERPlus). A source is random-access (len + item(i))
over a deterministic order, so make_shards can cut it into shards by index range on any number
of workers and get the same bytes.

Sources whose official files exclude some rows by design (AffectNet's non-expression codes,
FERPlus's unknown/non-face majorities, the other split) drop them at construction and report
them in `excluded`; rows that fail later (unreadable image) are *skipped* by make_shards.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from hncl.data.synthetic import EXPRESSIONS, SyntheticFaces

CLASSES = EXPRESSIONS + ("contempt",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# official label codes -> canonical index (None: not an expression, excluded)
RAFDB_LABELS = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 0}  # surprise fear disgust happiness sadness anger neutral
AFFECTNET_LABELS = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7}  # 8..10: none/uncertain/non-face
FER2013_LABELS = {0: 6, 1: 5, 2: 4, 3: 1, 4: 2, 5: 3, 6: 0}  # angry disgust fear happy sad surprise neutral
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
FERPLUS_LABELS = (0, 1, 3, 2, 6, 5, 4, 7)
FOLDER_ALIASES = {
    "neutral": 0, "happy": 1, "happiness": 1, "sad": 2, "sadness": 2, "surprise": 3, "surprised": 3,
    "fear": 4, "fearful": 4, "scared": 4, "disgust": 5, "disgusted": 5, "anger": 6, "angry": 6, "contempt": 7,
}
FER_SPLITS = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


class SourceError(Exception):
    """A row the source cannot deliver (e.g. an unreadable image); make_shards skips and counts it."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{reason}: {where}")
        self.reason, self.where = reason, where


@dataclass
class SourceItem:
    sample_id: int  # stable across runs and machines
    image: np.ndarray  # uint8 RGB [H, W, 3]
    label: Optional[int]  # canonical class index, None if unlabelled
    landmarks: Optional[np.ndarray]  # [68, 2] corner-origin pixels of `image`, if the source has them
    box: Optional[Tuple[float, float, float, float]]  # face box (x, y, w, h) in `image`, None = whole image
    meta: Dict[str, object] = field(default_factory=dict)


def stable_id(dataset: str, key: str) -> int:
    """A 63-bit id from the dataset name and the row's own key (path, row number)."""
    return int.from_bytes(hashlib.blake2b(f"{dataset}:{key}".encode(), digest_size=8).digest(), "big") >> 1


def load_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:
        raise SourceError("unreadable image", f"{path} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


class Source(abc.ABC):
    """Random access over a dataset's rows in a fixed order."""

    name = "base"
    excluded: Dict[str, int]

    def __len__(self) -> int:
        return len(self.rows)  # type: ignore[attr-defined]

    @abc.abstractmethod
    def item(self, index: int) -> SourceItem:
        """Row `index`: raises SourceError for a row that cannot be delivered."""

    @property
    def has_landmarks(self) -> bool:
        return False


class SyntheticSource(Source):
    name = "synthetic"

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, size: int = 112, per_identity: int = 14,
                 difficulty: str = "easy"):
        self.faces = SyntheticFaces(math.ceil(num_samples / per_identity), per_identity, size=size, seed=seed,
                                    split="test" if split == "test" else "train", difficulty=difficulty)
        self.num_samples, self.split, self.excluded = num_samples, split, {}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def has_landmarks(self) -> bool:
        return True

    def item(self, index: int) -> SourceItem:
        f = self.faces[index]
        return SourceItem(self.faces.sample_id(index), f.image, f.label, f.landmarks, None,
                          {"source": f"synthetic:{self.split}:{index}", "identity": f.identity,
                           "intensity": round(f.intensity, 4)})


def _image_files(root: str) -> List[str]:
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


class FolderSource(Source):
    """ImageFolder layout: ROOT/<class>/*.jpg with class folder names from FOLDER_ALIASES."""

    name = "folder"

    def __init__(self, root: str, split: str = "train"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"folder source: {root} is not a directory")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        unknown = [c for c in classes if c.lower() not in FOLDER_ALIASES]
        if unknown:
            raise ValueError(f"folder source: class folders {unknown} are not expression names; "
                             f"use one of {sorted(FOLDER_ALIASES)}")
        if not classes:
            raise ValueError(f"folder source: {root} has no class sub-folders")
        self.root, self.split, self.excluded = root, split, {}
        self.rows = [(p, FOLDER_ALIASES[c.lower()]) for c in classes for p in _image_files(os.path.join(root, c))]

    def item(self, index: int) -> SourceItem:
        path, label = self.rows[index]
        rel = os.path.relpath(path, self.root)
        return SourceItem(stable_id(self.name, rel), load_rgb(path), label, None, None, {"source": rel})


class UnlabeledSource(Source):
    """Any tree of images, no labels."""

    name = "unlabeled"

    def __init__(self, root: str, split: str = "train"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"unlabeled source: {root} is not a directory")
        self.root, self.split, self.excluded = root, split, {}
        self.rows = _image_files(root)
        if not self.rows:
            raise ValueError(f"unlabeled source: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")

    def item(self, index: int) -> SourceItem:
        path = self.rows[index]
        rel = os.path.relpath(path, self.root)
        return SourceItem(stable_id(self.name, rel), load_rgb(path), None, None, None, {"source": rel})


class RafDBSource(Source):
    """RAF-DB basic: EmoLabel/list_patition_label.txt ('train_00001.jpg 5') and
    Image/aligned/train_00001_aligned.jpg; the split is the file name's prefix."""

    name = "rafdb"

    def __init__(self, root: str, split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"rafdb has splits train and test, not {split!r}")
        labels = os.path.join(root, "EmoLabel", "list_patition_label.txt")
        if not os.path.exists(labels):
            raise FileNotFoundError(f"rafdb: {labels} not found (expected the RAF-DB basic layout)")
        self.root, self.split, self.excluded = root, split, {}
        self.rows = []
        with open(labels) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or int(parts[1]) not in RAFDB_LABELS:
                    raise ValueError(f"rafdb: {labels}:{n}: expected 'NAME LABEL(1-7)', got {line.strip()!r}")
                name, code = parts[0], int(parts[1])
                if name.startswith(split + "_"):
                    self.rows.append((name, RAFDB_LABELS[code]))
                else:
                    self.excluded["other split"] = self.excluded.get("other split", 0) + 1

    def item(self, index: int) -> SourceItem:
        name, label = self.rows[index]
        stem, ext = os.path.splitext(name)
        path = os.path.join(self.root, "Image", "aligned", f"{stem}_aligned{ext}")
        return SourceItem(stable_id(self.name, name), load_rgb(path), label, None, None,
                          {"source": os.path.relpath(path, self.root)})


class AffectNetSource(Source):
    """AffectNet's official CSV (training.csv / validation.csv): crop by the face box, use its 68
    landmarks; classes 0-6 (7-class) or 0-7 (8-class, with contempt); codes 8-10 excluded."""

    name = "affectnet"

    def __init__(self, root: str, split: str = "train", num_classes: int = 7, csv_path: Optional[str] = None,
                 image_dir: Optional[str] = None):
        if num_classes not in (7, 8):
            raise ValueError(f"affectnet: num_classes must be 7 or 8, got {num_classes}")
        csv_path = csv_path or os.path.join(root, "training.csv" if split == "train" else "validation.csv")
        if not os.path.exists(csv_path):
            raise FileNotFoundError(f"affectnet: {csv_path} not found")
        self.image_dir = image_dir or os.path.join(root, "Manually_Annotated_Images")
        self.root, self.split, self.excluded, self.rows = root, split, {}, []
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            need = {"subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression"}
            missing = need - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"affectnet: {csv_path} lacks columns {sorted(missing)}")
            for row in reader:
                code = int(row["expression"])
                if code not in AFFECTNET_LABELS or AFFECTNET_LABELS[code] >= num_classes:
                    reason = "contempt (7-class)" if code == 7 else "not an expression (codes 8-10)"
                    self.excluded[reason] = self.excluded.get(reason, 0) + 1
                    continue
                self.rows.append(row)

    @property
    def has_landmarks(self) -> bool:
        return True

    def item(self, index: int) -> SourceItem:
        row = self.rows[index]
        rel = row["subDirectory_filePath"]
        image = load_rgb(os.path.join(self.image_dir, rel))
        pts = np.array([float(v) for v in row["facial_landmarks"].split(";") if v.strip()], dtype=np.float64)
        if pts.size != 136:
            raise SourceError("bad landmarks", f"{rel}: {pts.size} values instead of 136")
        box = (float(row["face_x"]), float(row["face_y"]), float(row["face_width"]), float(row["face_height"]))
        # AffectNet gives integer pixel indices (centre convention): +0.5 for corner origin
        return SourceItem(stable_id(self.name, rel), image, AFFECTNET_LABELS[int(row["expression"])],
                          (pts.reshape(68, 2) + 0.5).astype(np.float32), box, {"source": rel})


def _fer_pixels(text: str, where: str) -> np.ndarray:
    vals = np.array(text.split(), dtype=np.float32)
    if vals.size != 48 * 48:
        raise SourceError("unreadable image", f"{where}: {vals.size} pixels instead of 2304")
    grey = vals.reshape(48, 48).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


class Fer2013Source(Source):
    """fer2013.csv (emotion, pixels, Usage); splits train=Training, val=PublicTest, test=PrivateTest."""

    name = "fer2013"

    def __init__(self, root: str, split: str = "train", csv_path: Optional[str] = None):
        if split not in FER_SPLITS:
            raise ValueError(f"{self.name}: split must be one of {sorted(FER_SPLITS)}, got {split!r}")
        csv_path = csv_path or (root if root.endswith(".csv") else os.path.join(root, "fer2013.csv"))
        if not os.path.exists(csv_path):
            raise FileNotFoundError(f"{self.name}: {csv_path} not found")
        self.split, self.excluded, self.rows = split, {}, []
        with open(csv_path, newline="") as f:
            for n, row in enumerate(csv.DictReader(f)):
                if row["Usage"] != FER_SPLITS[split]:
                    self.excluded["other split"] = self.excluded.get("other split", 0) + 1
                    continue
                self.rows.append((n, FER2013_LABELS[int(row["emotion"])], row["pixels"]))

    def item(self, index: int) -> SourceItem:
        n, label, pixels = self.rows[index]
        return SourceItem(stable_id("fer2013", str(n)), _fer_pixels(pixels, f"fer2013.csv row {n + 2}"), label,
                          None, None, {"source": f"fer2013.csv:{n + 2}"})


class FerPlusSource(Fer2013Source):
    """FERPlus: fer2013new.csv's 10-annotator votes relabel fer2013.csv's images (row-aligned).
    Majority vote; excluded when the majority is unknown / not-a-face, or tied between emotions."""

    name = "ferplus"

    def __init__(self, root: str, split: str = "train", num_classes: int = 8, csv_path: Optional[str] = None,
                 votes_path: Optional[str] = None):
        super().__init__(root, split, csv_path)
        votes_path = votes_path or os.path.join(os.path.dirname(csv_path or os.path.join(root, "x")), "fer2013new.csv")
        if not os.path.exists(votes_path):
            raise FileNotFoundError(f"ferplus: {votes_path} not found")
        with open(votes_path, newline="") as f:
            votes = list(csv.DictReader(f))
        kept = []
        for n, _, pixels in self.rows:
            v = votes[n]
            counts = np.array([float(v[c] or 0) for c in FERPLUS_COLUMNS], dtype=np.float64)
            other = max(float(v.get("unknown") or 0), float(v.get("NF") or 0))
            best = counts.max()
            if best <= other or best == 0:
                reason = "majority unknown or not a face"
            elif (counts == best).sum() > 1:
                reason = "tied vote"
            elif FERPLUS_LABELS[int(counts.argmax())] >= num_classes:
                reason = "contempt (7-class)"
            else:
                kept.append((n, FERPLUS_LABELS[int(counts.argmax())], pixels))
                continue
            self.excluded[reason] = self.excluded.get(reason, 0) + 1
        self.rows = kept


SOURCES = {"synthetic": SyntheticSource, "folder": FolderSource, "unlabeled": UnlabeledSource, "rafdb": RafDBSource,
           "affectnet": AffectNetSource, "fer2013": Fer2013Source, "ferplus": FerPlusSource}


def open_source(name: str, input_path: Optional[str] = None, split: str = "train", **kwargs) -> Source:
    """A source by name; `input_path` is its root (or CSV), `kwargs` source options."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    if name == "synthetic":
        return SyntheticSource(split=split, **kwargs)
    if not input_path:
        raise ValueError(f"source {name!r} needs --input PATH")
    return SOURCES[name](input_path, split=split, **kwargs)


def class_names(indices: Sequence[int]) -> List[str]:
    return [CLASSES[i] for i in indices]
