"""What the `hncl` command runs besides training and evaluation: the embedded demo, predict
on image files, and export to TorchScript / ONNX (the entry point is hncl/cli.py)."""
