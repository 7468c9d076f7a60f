"""Shared infrastructure: config, distributed helpers, metrics, checkpoints, logging."""
