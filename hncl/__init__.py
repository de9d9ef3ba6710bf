"""hncl: Heatmap Neighbor Contrastive Learning for facial expression recognition.

The method lives in three Ray-free modules: ``hncl.model`` (encoder, projector, predictor),
``hncl.queue`` (the heatmap-neighbour queue sharded over ranks) and ``hncl.loss`` (InfoNCE with
global negatives and neighbour positives); ``hncl.method`` ties them into one training step.
"""

__version__ = "0.1.0"
