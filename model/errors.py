"""The one base for mistakes in what the user asked for, so the CLI can tell them from bugs.

A missing column, an unknown fusion name, a misspelled metric or a run folder that is not a run is
the user's to fix: ``mmfusion`` prints ``error: <message>`` and exits 2 instead of a traceback that
buries the message. Anything else still raises with its traceback (it is a bug to report). Each
subclass keeps its builtin base too (``ValueError``, ``KeyError``, ...), so code that catches those
keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to change."""

    def __str__(self) -> str:  # KeyError's own __str__ would print the message quoted
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A training configuration value that cannot work (unknown key or metric, epochs < 1, ...)."""


class UnknownNameError(UserError, KeyError):
    """A name that is not in a registry (an encoder or fusion strategy)."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint that does not fit the model the configuration builds (e.g. a resume with other flags)."""


class OutputFolderError(UserError, ValueError):
    """An output folder that cannot be written without destroying something (the run, the user's files)."""


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance: the bundle must not ship (exit 1, not a usage error)."""
