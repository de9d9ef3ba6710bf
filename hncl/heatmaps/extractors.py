"""Heatmap extractors: face crops -> 68 x 64 x 64 landmark heatmaps (+ the 68 points).

One interface, three backends (conventions in hncl.heatmaps.render):
- ``landmarks``: Gaussian heatmaps rendered from given points (synthetic faces, AffectNet's CSV).
- ``dlib``: dlib's 68-point shape predictor (works offline; model from face_recognition_models
  or Debian's libdlib-data), then rendered like ``landmarks``.
- ``fan``: face-alignment's 2D-FAN-4 run **batched** on the device. Inputs are face crops, so no
  detector: the whole (square) crop is resized to 256 x 256, which makes FAN's 64 x 64 output
  cover exactly the crop.

Inputs are square face crops, uint8 [H, W, 3] RGB (a batch [B, S, S, 3] or a list).
"""

from __future__ import annotations

import abc
import importlib.util
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hncl.heatmaps.detect import DETECT_MODES, NO_FACE, SEVERAL_FACES, WHOLE_IMAGE
from hncl.heatmaps.render import HEATMAP_SIZE, N_POINTS, SIGMA, render_heatmaps

FAN_INPUT = 256
FAN_FILE = "2DFAN4-11f355bf06.pth.tar"
FAN_URL = f"https://www.adrianbulat.com/downloads/python-fan/{FAN_FILE}"
DLIB_MODEL = "shape_predictor_68_face_landmarks.dat"


@dataclass
class Extraction:
    heatmaps: torch.Tensor  # [B, 68, 64, 64] float32, on CPU
    landmarks: torch.Tensor  # [B, 68, 2] float32, image pixels (corner origin)
    ok: List[bool]  # False where the extractor could not handle the face
    reasons: List[Optional[str]]  # why not, per face
    # kept, but worth counting: e.g. "several faces (kept the largest)"
    notes: List[Optional[str]] = field(default_factory=list)

    def note(self, i: int) -> Optional[str]:
        return self.notes[i] if i < len(self.notes) else None


def _as_batch(images) -> List[np.ndarray]:
    imgs = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
    for i, im in enumerate(imgs):
        if im.ndim != 3 or im.shape[2] != 3 or im.shape[0] != im.shape[1]:
            raise ValueError(f"face {i}: expected a square RGB crop [S, S, 3], got shape {im.shape}")
    return imgs


class HeatmapExtractor(abc.ABC):
    """Face crops (+ optional given landmarks) -> Extraction."""

    name = "base"

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Backend, library version and model file: recorded in every shard manifest."""

    @abc.abstractmethod
    def extract(self, images, landmarks: Optional[np.ndarray] = None) -> Extraction:
        """Heatmaps and points for a batch of square uint8 RGB crops."""


class LandmarkHeatmaps(HeatmapExtractor):
    """Render heatmaps from given landmarks (no image analysis)."""

    name = "landmarks"

    def __init__(self, sigma: float = SIGMA):
        self.sigma = sigma

    @property
    def version(self) -> str:
        return f"landmarks-gauss-sigma{self.sigma}"

    def extract(self, images, landmarks: Optional[np.ndarray] = None) -> Extraction:
        imgs = _as_batch(images)
        if landmarks is None:
            raise ValueError("the 'landmarks' extractor needs the landmarks of every face")
        pts = torch.as_tensor(np.asarray(landmarks, dtype=np.float32)).reshape(len(imgs), N_POINTS, 2)
        sizes = {im.shape[0] for im in imgs}
        hms = torch.cat([render_heatmaps(pts[[i]], imgs[i].shape[0], sigma=self.sigma) for i in range(len(imgs))]) \
            if len(sizes) > 1 else render_heatmaps(pts, imgs[0].shape[0], sigma=self.sigma)
        ok = [bool(torch.isfinite(p).all()) for p in pts]
        return Extraction(hms, pts, ok, [None if o else "missing landmarks" for o in ok])


def find_dlib_model(path: Optional[str] = None) -> str:
    candidates = [path] if path else []
    spec = importlib.util.find_spec("face_recognition_models")
    if spec and spec.origin:  # importing the package itself fails without pkg_resources
        candidates.append(os.path.join(os.path.dirname(spec.origin), "models", DLIB_MODEL))
    candidates.append(f"/usr/share/dlib/{DLIB_MODEL}")
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise FileNotFoundError(
        f"dlib's 68-point model ({DLIB_MODEL}) not found; looked in: {', '.join(c for c in candidates if c)}. "
        f"Install it with `pip install face_recognition_models` or `apt-get install libdlib-data`, "
        f"or pass its path.")


class DlibHeatmaps(HeatmapExtractor):
    """dlib 68-point shape predictor, on the face found by dlib's HOG detector (see DETECT_MODES
    for what each `detect` mode does when there is no face, or several)."""

    name = "dlib"

    def __init__(self, model_path: Optional[str] = None, detect: str = "always", upsample: int = 1,
                 sigma: float = SIGMA):
        import dlib

        if detect not in DETECT_MODES:
            raise ValueError(f"detect must be one of {', '.join(DETECT_MODES)}, got {detect!r}")
        self.model_path = find_dlib_model(model_path)
        self.predictor = dlib.shape_predictor(self.model_path)
        self.detector = dlib.get_frontal_face_detector() if detect != "never" else None
        self.detect, self.upsample, self.sigma = detect, upsample, sigma
        self._dlib = dlib

    @property
    def version(self) -> str:
        return f"dlib-{self._dlib.__version__}:{os.path.basename(self.model_path)}:detect-{self.detect}"

    def _box(self, im: np.ndarray):
        """(dlib rectangle or None, note)."""
        if self.detector is not None:
            boxes = list(self.detector(im, self.upsample))
            if boxes:
                largest = max(boxes, key=lambda r: r.width() * r.height())
                return largest, SEVERAL_FACES if len(boxes) > 1 else None
            if self.detect == "always":
                return None, None
        s = im.shape[0]
        m = int(round(0.08 * s))  # aligned crops have a margin around the face
        return self._dlib.rectangle(m, m, s - 1 - m, s - 1 - m), WHOLE_IMAGE if self.detector is not None else None

    def extract(self, images, landmarks: Optional[np.ndarray] = None) -> Extraction:
        imgs = _as_batch(images)
        pts = torch.full((len(imgs), N_POINTS, 2), float("nan"))
        ok, reasons, notes = [], [], []
        for i, im in enumerate(imgs):
            box, note = self._box(np.ascontiguousarray(im))
            notes.append(note)
            if box is None:
                ok.append(False)
                reasons.append(NO_FACE)
                continue
            shape = self.predictor(np.ascontiguousarray(im), box)
            # dlib returns integer pixel indices (centre convention): +0.5 for corner origin
            pts[i] = torch.tensor([[p.x + 0.5, p.y + 0.5] for p in shape.parts()], dtype=torch.float32)
            ok.append(True)
            reasons.append(None)
        hms = torch.cat([render_heatmaps(pts[[i]], imgs[i].shape[0], sigma=self.sigma) for i in range(len(imgs))])
        return Extraction(hms, pts, ok, reasons, notes)


def find_fan_weights(path: Optional[str] = None, download: bool = False) -> str:
    """The 2D-FAN-4 weights file: `path`, $HNCL_FAN_WEIGHTS, or $TORCH_HOME/hub/checkpoints/."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", FAN_FILE)
    for c in (path, os.environ.get("HNCL_FAN_WEIGHTS"), hub):
        if c and os.path.exists(c):
            return c
    if path:
        raise FileNotFoundError(f"FAN weights file not found: {path}")
    how = (f"FAN weights not found. Download {FAN_URL} on a machine with internet access and put it "
           f"at {hub} (that is $TORCH_HOME/hub/checkpoints/{FAN_FILE}), or set HNCL_FAN_WEIGHTS / "
           f"pass the file's path")
    if not download:
        raise FileNotFoundError(how + "; or allow the download.")
    try:
        from face_alignment.utils import load_file_from_url

        return load_file_from_url(FAN_URL)
    except Exception as e:  # offline: say exactly what to do instead
        raise FileNotFoundError(f"{how}. (download failed: {str(e).splitlines()[0]})") from None


def fan_input(images: Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Square uint8 crops -> [B, 3, 256, 256] float in [0, 1] (FAN's input), resized on device."""
    out = []
    for im in images:  # crops may differ in size; each is resized to FAN's input on its own
        t = torch.from_numpy(np.ascontiguousarray(im)).to(device).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        if t.shape[-1] != FAN_INPUT:
            t = F.interpolate(t, size=(FAN_INPUT, FAN_INPUT), mode="bilinear", align_corners=False, antialias=True)
        out.append(t)
    return torch.cat(out)


def fan_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """FAN's decoding: argmax, a quarter-pixel step towards the higher neighbour, in heatmap
    coordinates with the corner origin. [B, P, 64, 64] -> [B, P, 2]."""
    b, p, h, w = heatmaps.shape
    idx = heatmaps.reshape(b, p, -1).argmax(-1)
    x, y = idx % w, idx // w
    pts = torch.stack([x, y], -1).float() + 0.5
    xi, yi = x.clamp(1, w - 2), y.clamp(1, h - 2)
    flat = heatmaps.reshape(b, p, -1)
    dx = flat.gather(-1, (y * w + xi + 1).unsqueeze(-1)) - flat.gather(-1, (y * w + xi - 1).unsqueeze(-1))
    dy = flat.gather(-1, ((yi + 1) * w + x).unsqueeze(-1)) - flat.gather(-1, ((yi - 1) * w + x).unsqueeze(-1))
    inside = ((x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)).unsqueeze(-1)
    step = torch.cat([dx, dy], -1).sign() * 0.25
    return pts + torch.where(inside, step, torch.zeros_like(step))


class FANHeatmaps(HeatmapExtractor):
    """face-alignment's 2D-FAN-4, batched. `network` replaces the loaded weights (tests use the
    real architecture with random weights)."""

    name = "fan"

    def __init__(self, weights: Optional[str] = None, device: str = "cpu", batch_size: Optional[int] = None,
                 download: bool = False, network: Optional[torch.nn.Module] = None):
        import face_alignment
        from face_alignment.models.fan import FAN

        self.device = torch.device(device)
        # chunks of 32 on a GPU; one at a time on CPU, where larger chunks are measured slower
        # (3.2 faces/s at 1, 2.1 at 8: the activations stop fitting in cache; docs/PERFORMANCE.md)
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 1)
        self._fa_version = getattr(face_alignment, "__version__", "?")
        if network is None:
            self.weights = find_fan_weights(weights, download)
            network = FAN(4)
            network.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        else:
            self.weights = None
        self.net = network.to(self.device).eval()

    @property
    def version(self) -> str:
        w = os.path.basename(self.weights) if self.weights else "custom-network"
        return f"fan-face_alignment-{self._fa_version}:{w}"

    @torch.no_grad()
    def heatmaps(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, 256, 256] on the device -> [B, 68, 64, 64], in chunks of batch_size."""
        outs = []
        for start in range(0, batch.shape[0], self.batch_size):
            out = self.net(batch[start:start + self.batch_size])
            outs.append(out[-1] if isinstance(out, (list, tuple)) else out)
        return torch.cat(outs)

    def extract(self, images, landmarks: Optional[np.ndarray] = None) -> Extraction:
        imgs = _as_batch(images)
        hms = self.heatmaps(fan_input(imgs, self.device)).float()
        sizes = torch.tensor([im.shape[0] for im in imgs], dtype=torch.float32, device=hms.device)
        pts = fan_points(hms) * (sizes / HEATMAP_SIZE).view(-1, 1, 1)
        finite = torch.isfinite(hms).flatten(1).all(1).tolist()
        return Extraction(hms.clamp(min=0).cpu(), pts.cpu(), finite,
                          [None if f else "non-finite FAN output" for f in finite])


def get_extractor(name: str, **kwargs) -> HeatmapExtractor:
    backends = {"landmarks": LandmarkHeatmaps, "dlib": DlibHeatmaps, "fan": FANHeatmaps}
    if name not in backends:
        raise ValueError(f"unknown heatmap extractor {name!r}; choose one of {', '.join(backends)}")
    return backends[name](**kwargs)
