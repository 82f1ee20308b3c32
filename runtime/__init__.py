"""PyTorch runtime for NeuroAda: train sparse deltas on any model and apply them (installed as neuroada_format.runtime)."""
