"""The project's own exception types: errors a user can cause, with a message saying what and where.

Each class carries the exit code the command line returns for it (the README's error table lists them).
"""


class RecsysError(Exception):
    """Base class: the command line prints the message and exits non-zero."""

    exit_code = 1  # only for a RecsysError raised without a subclass; an unexpected exception (a bug) also exits 1


class ConfigError(RecsysError):
    """A setting or Param has a value the pipeline cannot use."""

    exit_code = 2


class SourceError(RecsysError):
    """The dataset source cannot be reached, downloaded or recognised."""

    exit_code = 3


class DataFormatError(RecsysError):
    """A file cannot be read as the table it should hold (bad bytes, truncated row, wrong delimiter)."""

    exit_code = 4


class DataValidationError(RecsysError):
    """A table failed its expectation suite (table-level failure, or too many bad rows)."""

    exit_code = 5


class StageError(RecsysError):
    """A stage was asked to run without the outputs of the stages it depends on."""

    exit_code = 6


class NothingPublishedError(StageError):
    """The serving folder has no complete published set."""


class ChampionUnavailableError(StageError):
    """The registry's champion cannot be loaded: a serving stage is skipped (recorded), not run from it."""


class RunLockedError(RecsysError):
    """Another process is writing the same run folder (or the same stage of it)."""

    exit_code = 7


class ServiceError(RecsysError):
    """A service the run depends on (the MLflow tracking server, the S3 endpoint) failed or went away mid-run."""

    exit_code = 8


class PublishError(ServiceError):
    """A served set could not be published (e.g. the S3 bucket is unreachable)."""


class MachineError(RecsysError):
    """The machine refused a write that is the pipeline's to make: the disk or a quota is full, the file system
    went read-only, the process ran out of file handles. Not a bug and not the data: free space (or fix the
    file system) and run again; what the last good run left is unchanged (every write is atomic)."""

    exit_code = 9


class UnknownMovieError(ConfigError):
    """A title or movie id that is not in the served catalog."""


class UnknownUserError(ConfigError):
    """A user id that has no served recommendations."""
