"""The spec's machine-readable parts (schema/), installed as neuroada_format.spec for readers."""
