"""Prediction: the predict job (stream, resume, shards), batching and the engines (torch, ONNX Runtime)."""
