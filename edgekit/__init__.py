"""edgekit: take a PyTorch LLM to the hardware people own.

The public stage functions are imported lazily so that ``import edgekit`` (and
``edgekit --help``) never pulls in torch or transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["export_model", "open_engine", "validate", "__version__"]


def __getattr__(name: str):
    if name == "export_model":
        from edgekit.export import export_model

        return export_model
    if name == "open_engine":
        from edgekit.runtimes.registry import open_engine

        return open_engine
    if name == "validate":
        from edgekit.validate import validate

        return validate
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")
