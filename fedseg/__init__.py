"""fedseg: federated segmentation across hospital datasites that never share images."""

__version__ = "0.1.0"
