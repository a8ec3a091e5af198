"""compress: train -> prune -> distill -> quantize -> verified INT8 ONNX, as one recipe."""

__version__ = "0.1.0"
