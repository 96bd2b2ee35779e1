"""ONNX: the QDQ export, its graph form for onnxruntime, replay and verification."""
