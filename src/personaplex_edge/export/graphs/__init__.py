"""ONNX graph builders for the streaming networks: Mimi, the temporal transformer, the depformer, sampling."""
