"""hncl: Heatmap Neighbor Contrastive Learning for facial expression recognition.

The method lives in three Ray-free modules: ``hncl.model`` (encoder, projector, predictor),
``hncl.queue`` (the heatmap-neighbour queue sharded over ranks) and ``hncl.loss`` (InfoNCE with
global negatives and neighbour positives); ``hncl.methods`` composes them into one module per
method (simclr, nnclr, hncl, supervised), and ``hncl.train.engine`` trains any of them.
"""

__version__ = "0.1.0"
