"""Distributed pretraining: one loop (`loop.train_loop_per_worker`) for Ray Train workers,
torchrun processes and the single-process debug mode."""
