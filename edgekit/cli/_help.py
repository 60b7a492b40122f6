"""``--help`` without typer's type labels on flags and arguments.

typer >= 0.2x prints a ``<type>`` beside every parameter: ``--force <bool>`` reads as if the flag
took a value, and ``path <path>`` repeats the argument's name. Here a flag shows nothing, an
argument its name alone, and an option that takes a value its metavar or click's usual
upper-case placeholder (``--out PATH``, ``--runs INT``), much as typer showed before. Older typer
versions lack ``display_type_rich`` and need nothing.
"""

from __future__ import annotations

from typer import core

_TYPER_OPTION_TYPE = getattr(core.TyperOption, "display_type_rich", None)  # None before typer 0.2x


def _option_type(self, ctx) -> str | None:
    if self.is_flag or self.count:
        return None
    if self.metavar is not None:
        return self.metavar
    label = _TYPER_OPTION_TYPE(self, ctx) or ""  # "<int>", "<path>...", "<str>"
    return label.replace("<str>", "TEXT").replace("<", "").replace(">", "").upper() or None


def _argument_type(self, ctx) -> str | None:
    return None


def plain_types() -> None:
    """Make every edgekit command's help show placeholders as described above."""
    if _TYPER_OPTION_TYPE is not None and core.TyperOption.display_type_rich is _TYPER_OPTION_TYPE:
        core.TyperOption.display_type_rich = _option_type
    if hasattr(core.TyperArgument, "display_type_rich"):
        core.TyperArgument.display_type_rich = _argument_type
