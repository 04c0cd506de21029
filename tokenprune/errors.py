"""Exceptions and warnings raised by tokenprune.

Every error names what is wrong and, where there is one, the fix: the pipeline stage and field, the
plugin and its distribution, the reducer that returned an invalid result.
"""

from __future__ import annotations

from collections.abc import Iterable


class TokenpruneError(Exception):
    """Base class of every error raised by tokenprune."""


class PipelineError(TokenpruneError, ValueError):
    """A pipeline document is malformed or does not fit the installed reducers.

    The message lists every problem found, each with the stage (index and reducer), the field and,
    when the pipeline came from YAML, the line. ``problems`` holds them as
    :class:`tokenprune.pipeline.Problem` records.
    """

    def __init__(self, message: str, problems: Iterable[object] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class PluginError(TokenpruneError):
    """A plugin registered something invalid, or two plugins registered the same name."""


class UnknownReducerError(TokenpruneError, KeyError):
    """No installed plugin provides a reducer of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownTaskError(TokenpruneError, KeyError):
    """No installed plugin provides an evaluation task of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(TokenpruneError):
    """No installed adapter supports the model's ``model_type``."""


class UnsupportedTransformersError(TokenpruneError):
    """The installed transformers release is outside the range tokenprune is tested on.

    The message names the installed release, the supported range and the override
    (``TOKENPRUNE_ALLOW_UNSUPPORTED_TRANSFORMERS=1`` turns the refusal into a warning).
    """


class ReducerOutputError(TokenpruneError):
    """A reducer returned a selection or merge that breaks the contract (names plugin and defect)."""


class ReducerInputError(TokenpruneError, ValueError):
    """A reducer was given tokens it cannot rank (NaN or infinite values, wrong shape)."""


class PluginLoadWarning(UserWarning):
    """A plugin's entry point failed to import; the other plugins were loaded."""
