"""Errors the pipeline reports as one line (exit status 2) instead of a traceback."""


class CatnetError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class DataError(CatnetError):
    """An input file is missing, unreadable or not in the expected schema."""


class ConfigError(CatnetError):
    """A configuration value has the right type but an invalid value."""


class TrainingDiverged(CatnetError):
    """The training error became NaN or infinite, or rose far above where it started."""

    def __init__(self, epoch: int, error: float, why: str = "the error is not finite"):
        self.epoch = epoch
        self.error = error
        self.why = why
        super().__init__(f"training diverged at epoch {epoch}: {why} (error {error:.6g}); try a smaller train.lr")


class TrainingCollapsed(TrainingDiverged):
    """Training ended with a network no better than a constant: every output the same (saturated
    units), or an error no lower than that of the best constant prediction."""

    def __init__(self, epoch: int, error: float, why: str):
        self.epoch, self.error, self.why = epoch, error, why
        CatnetError.__init__(self, f"training failed after epoch {epoch}: {why} (error {error:.6g}); "
                                   "try a smaller train.lr or more train.epochs")
