"""The errors agpo_lab raises for what a user gave it: a setting, a file, a folder, a model.

Each says in one line what is wrong and how to fix it. The `agpo-lab` command prints such an error
as that one line and exits with status 2; any other exception is a bug and keeps its traceback.
They subclass the built-in error a caller would expect (ValueError for a bad value, OSError for a
file or folder), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class AgpoLabError(Exception):
    """A problem with the user's input or environment, reported in one line."""


class ConfigError(AgpoLabError, ValueError):
    """A setting that is missing, of the wrong type or out of range (names the key)."""


class MissingFileError(AgpoLabError, FileNotFoundError):
    """A file or folder the user named does not exist (names it)."""


class DataError(AgpoLabError, ValueError):
    """A data or log file that exists but cannot be read as expected (names the file and line)."""


class ModelLoadError(AgpoLabError, OSError):
    """A model or tokenizer that cannot be loaded: missing, corrupt or unreachable (names it)."""


class RunDirError(AgpoLabError, OSError):
    """A run directory that cannot be used now: locked by another process, not a folder, not
    writable, out of space, or already holding another run."""


class CheckpointError(AgpoLabError, ValueError):
    """A checkpoint that cannot be read (corrupt, wrong model) or written."""


class NonFiniteError(AgpoLabError, ArithmeticError):
    """A loss or weights that stopped being finite numbers during a run (names the step and the
    setting most likely at fault); the run stops without saving that step."""


class Interrupted(AgpoLabError):
    """Work stopped by Ctrl-C or SIGTERM after saving what it could; the same command continues
    it (the command line exits with status 130, as for any interrupted command)."""
