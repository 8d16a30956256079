"""catnet's Hydra launcher for an existing Ray cluster (hydra/launcher=ray_cluster)."""
