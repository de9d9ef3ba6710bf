"""Real photos with and without faces, from what scikit-image ships (no downloads): for the
tests of face detection in make_shards and predict."""

import os

import numpy as np
from PIL import Image


def _square(im: np.ndarray) -> np.ndarray:
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    s = min(im.shape[:2])
    return np.ascontiguousarray(im[:s, :s])


def photos() -> dict:
    """name -> (uint8 RGB image, number of faces dlib should find)."""
    from skimage import data

    astronaut = data.astronaut()  # a public-domain portrait
    face = astronaut[30:250, 110:330]
    group = np.full((440, 440, 3), 200, np.uint8)  # two people side by side
    group[110:330] = np.concatenate([face, face[:, ::-1]], 1)
    return {
        "astronaut": (astronaut, 1),
        "two_people": (group, 2),
        "cat": (data.chelsea(), 0),
        "coffee_cup": (data.coffee(), 0),
        "plain_blue": (np.full((240, 240, 3), (30, 60, 200), np.uint8), 0),
        "cameraman_grey": (_square(data.camera()), 0),  # a person whose face HOG misses
    }


def write_photos(folder: str) -> dict:
    """The photos as JPEG files in `folder`; returns name -> (path, faces)."""
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name, (im, faces) in photos().items():
        path = os.path.join(folder, f"{name}.jpg")
        Image.fromarray(im).save(path, quality=95)
        out[name] = (path, faces)
    return out
