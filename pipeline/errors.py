"""Expected errors: the CLI prints these as one line and exits 2, without a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input or environment that they can fix; the message says what and how."""


class UnknownBackboneError(PipelineError, KeyError):
    """The backbone name is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class StoreError(PipelineError):
    """A feature store is missing, foreign, incomplete or inconsistent."""


class DataError(PipelineError):
    """The image source is missing, empty or malformed."""


class ConfigError(PipelineError, ValueError):
    """A configuration value out of its valid range."""
