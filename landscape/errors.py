"""One exception family. The library raises these with a message a user can act on;
only the CLI catches them (prints ``landscape: error: <message>``, exits non-zero)."""


class LandscapeError(Exception):
    """Base class of every error the library reports to users."""


class ConfigError(LandscapeError):
    """An option or configuration value is invalid."""


class DataError(LandscapeError):
    """A dataset is unknown, missing or malformed."""


class ModelError(LandscapeError):
    """A model is unknown, cannot be built, or does not fit the data."""


class FileFormatError(LandscapeError):
    """A file is missing, unreadable, not of the expected format, or would be overwritten."""


class GeometryError(LandscapeError):
    """A plane or line is degenerate (duplicate or collinear checkpoints, zero direction)."""


class CheckpointError(LandscapeError):
    """A run or checkpoint name does not exist in a trajectory file."""


class TrustError(LandscapeError):
    """A file names code (an import path) that the user has not allowed to run."""


class WriteError(FileFormatError):
    """Writing a file failed (a full disk, a vanished folder); what was kept is in the message."""


class StalePartialError(FileFormatError):
    """An output's ``.partial`` file holds unfinished work of another spec or input (``--overwrite``
    discards it)."""


class ProcessDied(LandscapeError):
    """A process doing part of the work ended without a word (killed: out of memory, ``kill -9``); what
    the others kept is in the message."""


class HeldWorkError(FileFormatError):
    """An output's ``.partial`` file holds interrupted work: ``other`` when of another configuration
    (only discarding it helps: ``--overwrite``), else of this one (resumable); ``damaged``: what is
    wrong with its record of that work, when something is (only discarding it helps)."""

    def __init__(self, message: str, other: bool, damaged: str | None = None):
        super().__init__(message)
        self.other, self.damaged = other, damaged
