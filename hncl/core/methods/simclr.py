"""SimCLR-style two-view baseline: the two augmented views of each face are each other's only
positive, against every other face of the global batch.

    loss = 1/2 [NCE(z1, p2) + NCE(z2, p1)]

(With NNCLR's predictor, as in the other methods here, so that the comparison varies only the
positives.)

Example (one process)::

    >>> import torch
    >>> from hncl.config import load_config
    >>> from hncl.core.methods import build_method
    >>> from hncl.core.model import HNCLModel
    >>> cfg = load_config(None, ["method.name=simclr", "model.proj_out=64"])
    >>> model = HNCLModel("resnet18", width=8, proj_hidden=16, proj_out=cfg.model.proj_out, pred_hidden=16)
    >>> x = torch.randn(4, 3, 32, 32)
    >>> loss, metrics = build_method(cfg, model).training_step({"x1": x, "x2": x.flip(-1), "id": torch.arange(4)})
    >>> sorted(metrics)
    ['loss', 'loss_view']
"""

from __future__ import annotations

from torch.profiler import record_function

from hncl.core.loss import Predictions, report, view_term
from hncl.core.methods.base import Method


class SimCLR(Method):
    name = "simclr"

    def training_step(self, batch):
        z1, p1, z2, p2 = self.forward(batch)
        with record_function("hncl/loss"):
            loss = view_term(z1, z2, Predictions.gather(p1, p2), self.temperature)
            return loss, report({"loss_view": loss, "loss": loss})
