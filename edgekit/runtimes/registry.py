"""Runtimes found by name, and ``open_engine``: the one way every caller runs an engine.

A runtime is any module in ``edgekit/runtimes/`` that sets ``RUNTIME`` (see ``base.py``), or a
file named in ``EDGEKIT_RUNTIMES`` (paths separated by ``os.pathsep``): adding one is one file.
Nothing here imports a vendor SDK; a runtime imports its own inside its methods.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path
from typing import Any

from edgekit.errors import ArtifactError, ConfigError, RuntimeUnavailableError, did_you_mean
from edgekit.runtimes.base import Runtime, Session

_RUNTIMES: dict[str, Runtime] = {}
_LOADED: set[str] = set()  # EDGEKIT_RUNTIMES files already imported
_SEARCHED = [False]  # whether the package's own runtime modules were imported


def register(runtime: Runtime) -> Runtime:
    """Make ``runtime`` findable under each of its names (a later one with the same name wins)."""
    for name in runtime.names:
        _RUNTIMES[name] = runtime
    return runtime


def load_runtime_file(path: str | Path) -> Runtime:
    """Import a runtime module from a file outside the package and register its ``RUNTIME``."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"edgekit_runtime_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ConfigError(f"runtime module {path} does not exist", "check EDGEKIT_RUNTIMES")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a plug-in's own bug: name it, no traceback
        raise ConfigError(f"runtime module {path} failed to import ({type(exc).__name__}: {exc})",
                          "fix the module, or remove it from EDGEKIT_RUNTIMES") from None
    if not hasattr(module, "RUNTIME"):
        raise ConfigError(f"runtime module {path} sets no RUNTIME", "see edgekit/runtimes/base.py for the contract")
    return register(module.RUNTIME)


def runtimes(extras: bool = True) -> dict[str, Runtime]:
    """{name: runtime} for every runtime module of the package and (with ``extras``) of
    ``EDGEKIT_RUNTIMES``."""
    if not _SEARCHED[0]:
        package = importlib.import_module("edgekit.runtimes")
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"edgekit.runtimes.{info.name}")
            if hasattr(module, "RUNTIME"):
                register(module.RUNTIME)
        _SEARCHED[0] = True
    for extra in filter(None, os.environ.get("EDGEKIT_RUNTIMES", "").split(os.pathsep) if extras else []):
        if extra not in _LOADED:
            load_runtime_file(extra)
            _LOADED.add(extra)
    return _RUNTIMES


def runtime_names(extras: bool = True) -> list[str]:
    """Every name a profile or ``--runtime`` may use."""
    return sorted(runtimes(extras))


def get_runtime(name: str, prefer: list[str] | tuple[str, ...] = (), what: str = "runtime") -> Runtime:
    """The runtime called ``name``, or for a family name (``ort``) the first of that family in
    ``prefer`` (a profile's runtimes), else the family's first; unknown names are an error that
    calls the value ``what`` (``--runtime`` when the user typed it)."""
    known = runtimes()
    family = [r for r in [*prefer, *sorted(known)] if r in known and known[r].family == name]
    if name not in known and family:
        return known[family[0]]
    if name not in known:
        names = sorted({*known, *(r.family for r in known.values())})
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(names)}{did_you_mean(name, names)}",
                          f"use one of: {', '.join(names)}")
    return known[name]


def require_available(runtime: Runtime) -> None:
    """Refuse a runtime whose SDK is missing here, naming the extra that brings it."""
    reason = runtime.is_available()
    if reason:
        raise RuntimeUnavailableError(f"runtime {runtime.names[0]} cannot run here: {reason}",
                                      f"pip install 'edgekit-llm[{runtime.extra}]'")


def open_engine(path: str | Path | Any, threads: int | None = None, memory_map: bool | None = None) -> Session:
    """Open an export or build folder (or an ``Engine`` already loaded) on its runtime; a build must
    fit this machine."""
    from edgekit.types import Engine

    engine = path if isinstance(path, Engine) else Engine.load(path)
    runtime = get_runtime(engine.runtime)
    if engine.kind == "build":
        check_engine_fits(engine)
    require_available(runtime)
    return runtime.open(engine, threads=threads, memory_map=memory_map)


def check_engine_fits(engine: Any, machine: Any = None) -> None:
    """Refuse a build made for other hardware, naming both and how to rebuild."""
    from edgekit.doctor import detect, fitting_profile

    machine = machine if machine is not None else detect()
    missing = engine_missing(engine.runtime, engine.requirements, machine)
    if missing:
        here = fitting_profile(machine) or "no shipped profile"
        source = (engine.source_export or {}).get("path", "EXPORT_DIR")
        raise EngineDoesNotFit(
            f"{engine.path} was built for {engine.profile} ({engine.runtime}); this machine ({here}) differs: "
            + "; ".join(missing),
            f"rebuild here: edgekit build {source} --profile {here if here != 'no shipped profile' else 'PROFILE'} -o NEW_DIR",
        )


def engine_missing(runtime: str, requirements: dict[str, Any], machine: Any) -> list[str]:
    """What ``machine`` lacks to run an engine of ``runtime`` with ``requirements``; empty when it fits.

    The requirements name the device, its compute capability or CPU flags, the provider and the
    TensorRT version (edgekit.doctor checks them on ``machine``); whether the runtime's SDK imports
    is checked when the engine is opened here (``require_available``).
    """
    from edgekit.doctor import missing_requirements

    if runtime not in runtimes():  # written by a newer edgekit, or for a plug-in not loaded here
        return [f"runtime {runtime!r} is not one this edgekit knows ({', '.join(runtime_names())})"]
    return missing_requirements(requirements, machine)


class EngineDoesNotFit(ArtifactError):
    """A build for other hardware (or a runtime this machine lacks)."""
