"""Segmentation models, losses, metrics and the local training loop (torch/numpy only)."""
