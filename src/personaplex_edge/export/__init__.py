"""The workstation toolchain (`ppx-export`): checkpoint -> ONNX graphs -> quantized graphs -> TensorRT engines."""
