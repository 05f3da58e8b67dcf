"""Deployment: per-task snapshots and ONNX export."""
