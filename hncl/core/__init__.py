"""The method core: encoders, the projector/predictor model, the sharded neighbour queue, exact
top-k, the loss terms and one module per method. Plain PyTorch: it runs in one process or in the
ranks of any torch.distributed group and imports nothing of Ray, S3 or the infrastructure
(tests/test_layers.py holds it to that)."""
