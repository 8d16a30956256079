"""Errors the pipeline reports as one line (exit status 2) instead of a traceback.

The library names values by its own parameter names (``lr``, ``loss``, ``folds``); the
pipeline, which knows which of its settings feeds each parameter, reports them under that
name: ``error.message(names)``."""

from typing import Mapping


class CatnetError(Exception):
    """Base class: a problem with the user's input, not a bug."""

    def message(self, names: Mapping[str, str] = {}) -> str:  # noqa: B006 - read only
        """The one-line report, each parameter called by its name in ``names`` if it has one."""
        return str(self)


class DataError(CatnetError):
    """An input file is missing, unreadable or not in the expected schema."""


class ConfigError(CatnetError):
    """A configuration value has the right type but an invalid value."""


class BadValue(ConfigError):
    """``param=value``: the problem."""

    def __init__(self, param: str, value, problem: str):
        self.param, self.value, self.problem = param, value, problem
        super().__init__(self.message())

    def message(self, names: Mapping[str, str] = {}) -> str:  # noqa: B006
        return f"{names.get(self.param, self.param)}={self.value!r}: {self.problem}"


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BadValue(name, value, f"must be one of {', '.join(choices)}")


class TrainingDiverged(CatnetError):
    """The training error became NaN or infinite, or rose far above where it started."""

    advice = (("a smaller", "lr"),)  # what to change, parameter by parameter

    def __init__(self, epoch: int, error: float, why: str = "the error is not finite"):
        self.epoch = epoch
        self.error = error
        self.why = why
        super().__init__(self.message())

    def _what(self) -> str:
        return f"training diverged at epoch {self.epoch}: {self.why} (error {self.error:.6g})"

    def message(self, names: Mapping[str, str] = {}) -> str:  # noqa: B006
        advice = " or ".join(f"{how} {names.get(param, param)}" for how, param in self.advice)
        return f"{self._what()}; try {advice}"


class TrainingCollapsed(TrainingDiverged):
    """Training ended with a network no better than a constant: every output the same (saturated
    units), or an error no lower than that of the best constant prediction."""

    advice = (("a smaller", "lr"), ("more", "epochs"))

    def __init__(self, epoch: int, error: float, why: str):
        self.epoch, self.error, self.why = epoch, error, why
        CatnetError.__init__(self, self.message())

    def _what(self) -> str:
        return f"training failed after epoch {self.epoch}: {self.why} (error {self.error:.6g})"


class TrialPruned(Exception):
    """A search stopped this trial at ``step`` (its intermediate ``value`` could not win): a result
    of the search, neither an error nor a failure."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"pruned by the search at step {step} (intermediate value {value:.4g})")
