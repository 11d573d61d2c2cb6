"""frcnn: a Faster R-CNN training framework in pure PyTorch."""

__version__ = "0.1.0"
