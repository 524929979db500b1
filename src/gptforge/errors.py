"""The one family of user-facing errors.

Every mistake a user can make (a bad config field, a missing file, an invalid generation parameter, a
malformed data record) raises a `GptforgeError` whose message names the file, field or parameter and
what was expected. The CLI prints such errors as one line and exits with status 2; the server turns
`ParameterError` into an OpenAI-shaped 400 naming `param`. Anything else is a bug and keeps its traceback.

Subclasses also derive from the builtin a caller would naturally catch (ValueError, RuntimeError), so
`except ValueError` keeps working. This module imports nothing, so every layer can use it.
"""

from __future__ import annotations



class GptforgeError(Exception):
    """Base class of errors caused by user input (files, configs, parameters, data)."""


class ConfigError(GptforgeError, ValueError):
    """A configuration value is missing or invalid; the message names the field."""


class ParameterError(GptforgeError, ValueError):
    """An invalid argument of a public function or request; `param` names it (e.g. "temperature")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class CheckpointError(GptforgeError, RuntimeError):
    """A checkpoint or model directory is missing, truncated or does not match the model; names the file."""


class DataError(GptforgeError, ValueError):
    """A data file or record is unreadable or malformed; the message names the file and line or record."""


__all__ = ["GptforgeError", "ConfigError", "ParameterError", "CheckpointError", "DataError"]
