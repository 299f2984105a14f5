"""Adapters on disk: our file format (`format.py`), the verbs `save_adapters` / `load_adapters` (`io.py`), the
upstream repository's checkpoints (`upstream.py`), and HF `save_pretrained` / Trainer resume (`pretrained.py`)."""
