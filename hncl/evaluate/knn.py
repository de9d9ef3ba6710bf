"""Nearest neighbours with faiss: kNN classification of frozen features and neighbour purity.

Cosine similarity = inner product of L2-normalised vectors (IndexFlatIP, exact); `ivf` builds an
IndexIVFFlat (approximate, sub-linear) for sets of millions of samples.
"""

from __future__ import annotations

import math

import numpy as np


def check_single_faiss() -> None:
    """faiss-cpu and faiss-gpu install the same module `faiss`; with both, whichever was
    installed last silently wins and the other's files linger: refuse, and say how to fix it."""
    from importlib import metadata

    found = []
    for dist in ("faiss-cpu", "faiss-gpu"):
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(found) > 1:
        raise RuntimeError("both faiss-cpu and faiss-gpu are installed; they provide the same module `faiss`. "
                           "Uninstall both and reinstall one: pip install -e '.[cpu]' or '.[gpu]'")


def _index(train: np.ndarray, kind: str = "flat", nprobe: int = 16):
    check_single_faiss()
    import faiss

    d = train.shape[1]
    if kind == "flat" or train.shape[0] < 4096:  # IVF needs enough points to train its lists
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = int(4 * math.sqrt(train.shape[0]))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.nprobe = nprobe
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat or ivf)")
    index.add(train)
    return index


def normalise(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def search(train, query, k: int, kind: str = "flat"):
    """(similarities [Q, k], indices [Q, k]) of the k most cosine-similar train rows."""
    index = _index(normalise(train), kind)
    return index.search(normalise(query), k)


def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k: int = 20,
                temperature: float = 0.07, kind: str = "flat") -> np.ndarray:
    """Weighted vote of the k nearest train samples, weight exp(cos / temperature) (as in
    InstDisc / DINO's kNN protocol). Returns predicted labels [Q]."""
    train_labels = np.asarray(train_labels)
    sims, idx = search(train_feats, test_feats, min(k, len(train_labels)), kind)
    votes = np.zeros((len(idx), num_classes))
    weights = np.exp(sims / temperature)
    np.add.at(votes, (np.arange(len(idx))[:, None].repeat(idx.shape[1], 1), train_labels[idx]), weights)
    return votes.argmax(1)


def neighbour_purity(feats, labels, k: int = 1, kind: str = "flat") -> float:
    """Fraction of each sample's k nearest other samples that share its label."""
    labels = np.asarray(labels)
    _, idx = search(feats, feats, k + 1, kind)
    own = np.arange(len(labels))[:, None]
    # drop each query itself (usually first; ties with a duplicate may put it later)
    keep = np.array([[j for j in row if j != i][:k] for i, row in zip(own[:, 0], idx)])
    return float((labels[keep] == labels[:, None]).mean())


def chance_purity(labels) -> float:
    counts = np.bincount(np.asarray(labels))
    p = counts / counts.sum()
    return float((p ** 2).sum())
