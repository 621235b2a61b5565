"""The classifier stage: labels each chat prompt with its category (ONNX model)."""
