"""NNCLR (Dwibedi et al., 2021), exactly: each view's positive is the nearest neighbour of the
*other* view's embedding in a queue of past embeddings (the support set).

    nn_v = the queue entry nearest to z_v (cosine, in embedding space; top-k: each a positive)
    loss = 1/2 [NCE(nn_1, p2) + NCE(nn_2, p1)]
    queue.enqueue(z1)

The two-view term is reported (loss_view) but not trained on, as in the paper.

Example (one process)::

    >>> import torch
    >>> from hncl.config import load_config
    >>> from hncl.core.methods import build_method
    >>> from hncl.core.model import HNCLModel
    >>> cfg = load_config(None, ["method.name=nnclr", "method.queue_size=64", "model.proj_out=64"])
    >>> model = HNCLModel("resnet18", width=8, proj_hidden=16, proj_out=cfg.model.proj_out, pred_hidden=16)
    >>> nnclr = build_method(cfg, model)
    >>> x = torch.randn(4, 3, 32, 32)
    >>> loss, metrics = nnclr.training_step({"x1": x, "x2": x.flip(-1), "id": torch.arange(4)})
    >>> metrics["queue_fill"], nnclr.queue.fill_fraction()  # looked up while empty; then z1 enqueued
    (0.0, 0.0625)
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from hncl.core.loss import Predictions, neighbour_term, report, view_term
from hncl.core.methods.base import QueueMethod


class NNCLR(QueueMethod):
    name = "nnclr"

    def __init__(self, cfg, model, **kwargs):
        super().__init__(cfg, model, key_dim=None, **kwargs)  # the embeddings are the search keys

    def training_step(self, batch):
        z1, p1, z2, p2 = self.forward(batch)
        ids, labels = batch["id"], batch.get("label")
        with record_function("hncl/queue_lookup"):
            n1 = self.queue.lookup(z1.detach(), ids, self.topk)
            n2 = self.queue.lookup(z2.detach(), ids, self.topk)
        with record_function("hncl/loss"):
            preds = Predictions.gather(p1, p2)
            with torch.no_grad():  # monitored, not trained on
                loss_view = view_term(z1, z2, preds, self.temperature)
            loss = neighbour_term(n1.embeddings, n1.valid, n2.embeddings, n2.valid, preds, self.temperature)
            metrics = report({"loss_view": loss_view, "loss_nn": loss, "loss": loss})
        with record_function("hncl/neighbour_metrics"):
            metrics.update(self.neighbour_metrics(n1, labels))
        with record_function("hncl/queue_enqueue"):
            self.queue.enqueue(None, z1.detach(), ids, labels)
        return loss, metrics
