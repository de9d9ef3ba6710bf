"""hncl: Heatmap Neighbor Contrastive Learning for facial expression recognition.

The packages are the layers (README, Architecture):
- ``hncl.core``: the method, plain PyTorch (encoders, model, sharded neighbour queue, exact top-k,
  loss terms, one module per method); imports no Ray, S3 or infrastructure.
- ``hncl.data`` and ``hncl.heatmaps``: shard sets (sources, faces, heatmaps, the streaming reader).
- ``hncl.train``: the engine, the pretraining and fine-tuning loops, and ``launch``, the one way a
  worker function runs (in this process, under torchrun or on Ray).
- ``hncl.evaluate``: features, kNN, metrics, reports and plots.
- ``hncl.infra``: storage and S3, the Ray cluster, temp files, the checks run before any worker.
- ``hncl.commands`` and ``hncl.cli``: the demo, predict, export and the ``hncl`` command.
``hncl.config`` owns every setting; ``hncl.errors`` the errors a user sees in one line.
"""

__version__ = "0.1.0"
