"""onnxdfq: data-free quantization of ONNX models."""
