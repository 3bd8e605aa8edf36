"""Launching jobs: local multi-process spawn, SLURM scripts, config sweeps. No JAX here."""
