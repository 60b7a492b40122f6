"""Errors users see: one line saying what failed and with which input, plus a hint.

The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits 1 for any
:class:`EdgekitError`; anything else is a bug (:class:`InternalError`).
"""

from __future__ import annotations

import difflib


class EdgekitError(Exception):
    """A failure the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ModelNotFoundError(EdgekitError):
    """MODEL is neither a local folder, a preset, nor a reachable hub id."""


class UnsupportedArchitectureError(EdgekitError):
    """The config names an architecture edgekit has no exporter for."""


class ConfigError(EdgekitError):
    """A model config or artifact sidecar is missing a field or is malformed."""


class OutputExistsError(EdgekitError):
    """The output path exists and --force was not given."""


class ArtifactError(EdgekitError):
    """An export/build folder is missing, corrupt, or incompatible."""


class RuntimeUnavailableError(EdgekitError):
    """A runtime's SDK is not installed or cannot run here."""


class MissingDependencyError(EdgekitError):
    """An optional extra is needed for this command."""


class InternalError(EdgekitError):
    """A bug in edgekit: please report it."""


def did_you_mean(value: str, choices: list[str]) -> str:
    """Return ' Did you mean X?' when a close match exists, else ''."""
    close = difflib.get_close_matches(value, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def require(module: str, extra: str | tuple[str, ...]):
    """Import an optional dependency or raise a MissingDependencyError naming the extra (or the
    extras that each bring it, e.g. ("cpu", "gpu"))."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extras = (extra,) if isinstance(extra, str) else extra
        raise MissingDependencyError(
            f"this command needs {module!r}, which is not installed ({exc})",
            " or ".join(f"pip install 'edgekit-llm[{name}]'" for name in extras),
        ) from None
