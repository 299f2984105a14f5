"""Adapters on disk: our file format (`format.py`, written as one transaction), the checks on load (`schema.py`),
the verbs `save_adapters` / `load_adapters` (`io.py`), the upstream repository's checkpoints (`upstream.py`), and
HF `save_pretrained` / Trainer resume (`pretrained.py`)."""
