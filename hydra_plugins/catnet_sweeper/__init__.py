"""catnet's default Hydra sweeper (hydra/sweeper=catnet): Hydra's basic sweeper, each job's config composed once."""
