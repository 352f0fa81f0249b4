"""Backends that run a build's graphs with their streaming state kept inside (ONNX Runtime, TensorRT)."""
