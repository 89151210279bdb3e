"""The one family of errors glora-ray raises on bad input.

Every error about what a user passed in (an option, a file, a dataset, a subnet, a budget) derives
from ``GLoRARayError``, so a command line can report those in one line and let anything else (a bug,
a failure after compute started) keep its traceback.
"""
from __future__ import annotations


class GLoRARayError(ValueError):
    """Bad input: the message names the option, file, field or value and what would be valid."""


class GLoRARayTypeError(GLoRARayError, TypeError):
    """Bad input of the wrong type (a model, a layer, a space where another was expected)."""


def one_line(err: BaseException) -> str:
    """``"<ErrorType>: <first line of its message>"``, for one-line reports of a third party's error."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


class TrainingDiverged(GLoRARayError):
    """A training whose loss or adapter weights stopped being finite (docs/method.md §7): the
    learning rate or the space is wrong for this model and data, so nothing trained may be used.

    ``epoch`` and ``step`` (1-based, as the progress lines count) and ``what`` (e.g. ``"loss nan"``)
    say where; they are for the code that adds the dataset and the advice to the message, and are
    not carried through pickling (the message is).
    """

    def __init__(self, message: str, *, epoch: int | None = None, step: int | None = None, what: str = ""):
        super().__init__(message)
        self.epoch, self.step, self.what = epoch, step, what
