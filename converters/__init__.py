"""Converters: merge adapters into safetensors checkpoints and ONNX models, and build adapters (installed as neuroada_format.converters)."""
