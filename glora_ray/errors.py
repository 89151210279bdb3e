"""The one family of errors glora-ray raises on bad input.

Every error about what a user passed in (an option, a file, a dataset, a subnet, a budget) derives
from ``GLoRARayError``, so a command line can report those in one line and let anything else (a bug,
a failure after compute started) keep its traceback.
"""
from __future__ import annotations

import errno


class GLoRARayError(ValueError):
    """Bad input: the message names the option, file, field or value and what would be valid."""


class GLoRARayTypeError(GLoRARayError, TypeError):
    """Bad input of the wrong type (a model, a layer, a space where another was expected)."""


class DamagedFileError(GLoRARayError):
    """A file a run wrote earlier that cannot be read back (cut short, edited, replaced)."""


class NoSpaceError(GLoRARayError):
    """A write failed for want of disk space (ENOSPC): nothing half-written is kept."""

    @classmethod
    def found_in(cls, err: BaseException) -> "NoSpaceError | None":
        """The one-line error for ``err`` when it (or what caused it) is a full disk, else None."""
        seen: set[int] = set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                where = f" writing {err.filename}" if err.filename else ""
                return cls(f"no space left on the device{where} ({err.strerror}); free space (or move --out, "
                           f"GLORA_RAY_HOME, Ray's temp dir) and run the same command again: it resumes from what "
                           f"was complete")
            err = err.__cause__ or err.__context__ or getattr(err, "cause", None)
        return None


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
