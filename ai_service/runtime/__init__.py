"""Inference runtimes (ONNX Runtime sessions)."""
