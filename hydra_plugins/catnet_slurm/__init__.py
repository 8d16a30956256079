"""catnet's Hydra launcher for a SLURM cluster (hydra/launcher=slurm)."""
