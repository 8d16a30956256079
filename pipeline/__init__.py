"""Hydra entry points: one module per stage (python -m pipeline.<stage>, what dvc.yaml runs)
and ``python -m pipeline``, which runs all four in one process (what sweeps run)."""
