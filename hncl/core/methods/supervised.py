"""Supervised contrastive pretraining (Khosla et al., 2020): the faces of the global batch that
carry the same expression label are positives. The upper bound for what heatmap neighbours can
deliver without labels: HNCL's in-batch term with perfect neighbours.

    P_i  = {j in the global batch : label_j = label_i} (i's own other view included; unlabelled
           faces: only their other view)
    loss = view term (as SimCLR) + 1/2 [NCE(z1, p2[P]) + NCE(z2, p1[P])]

The view term stays because SupCon's term alone did not learn in the demo's 150-step budget
(validation linear probe 0.200, below a random-init encoder's 0.336; with the view term 0.504).

Example (one process)::

    >>> import torch
    >>> from hncl.config import load_config
    >>> from hncl.core.methods import build_method
    >>> from hncl.core.model import HNCLModel
    >>> cfg = load_config(None, ["method.name=supervised", "model.proj_out=64"])
    >>> model = HNCLModel("resnet18", width=8, proj_hidden=16, proj_out=cfg.model.proj_out, pred_hidden=16)
    >>> x = torch.randn(4, 3, 32, 32)
    >>> batch = {"x1": x, "x2": x.flip(-1), "id": torch.arange(4), "label": torch.tensor([0, 0, 1, -1])}
    >>> loss, metrics = build_method(cfg, model).training_step(batch)
    >>> sorted(metrics)
    ['loss', 'loss_supervised', 'loss_view']
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from hncl.core import dist as hdist
from hncl.core.loss import Predictions, positives_term, report, view_term
from hncl.core.methods.base import Method


def label_positives(labels: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: for each local sample, the global-batch samples with its label, itself
    included (its other view); an unlabelled sample (-1) has only itself."""
    sizes = hdist.gather_sizes(labels.shape[0], labels.device)
    everyone = hdist.all_gather_rows(labels, sizes)
    own = torch.arange(labels.shape[0], device=labels.device) + sum(sizes[: hdist.rank()])
    same = (labels.unsqueeze(1) == everyone.unsqueeze(0)) & (labels.unsqueeze(1) >= 0)
    same[torch.arange(labels.shape[0], device=labels.device), own] = True
    return same


class Supervised(Method):
    name = "supervised"

    def training_step(self, batch):
        if "label" not in batch:
            raise ValueError("the supervised method needs labels (batch['label'])")
        z1, p1, z2, p2 = self.forward(batch)
        with record_function("hncl/loss"):
            preds = Predictions.gather(p1, p2)
            loss_view = view_term(z1, z2, preds, self.temperature)
            loss_supervised = positives_term(z1, z2, preds, label_positives(batch["label"].to(z1.device)),
                                             self.temperature)
            loss = loss_view + loss_supervised
            return loss, report({"loss_view": loss_view, "loss_supervised": loss_supervised, "loss": loss})
