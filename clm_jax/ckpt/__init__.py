"""Checkpoints: Orbax train state, params-only, Hugging Face; one reader for all (load.py)."""
