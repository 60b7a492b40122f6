"""``edgekit doctor``: this machine, what of it works, and the profile that fits."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.cli._output import print_json

# The flags edgekit's kernels and profiles care about; --json lists every flag.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2")


def doctor(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show this machine's CPU, RAM, GPUs, runtime versions, working providers and fitting profile."""
    from edgekit.doctor import detect, fitting_profile

    machine = detect()
    profile = fitting_profile(machine)
    if json_out:
        print_json({**machine.to_dict(), "profile": profile})
        return
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in _rows(machine, profile):
        table.add_row(escape(label), value)
    Console().print(table)


def _rows(machine, profile: str | None) -> list[tuple[str, str]]:
    """(label, Rich markup) pairs; what comes from the machine is escaped ("[ONNXRuntimeError] ...")."""
    isa = [f for f in ISA_FLAGS if f in machine.cpu_flags]
    rows = [
        ("CPU", escape(f"{machine.cpu_model} ({machine.arch}, {machine.cores} cores)")),
        ("ISA", " ".join(isa) or "none of note"),
        ("RAM", f"{machine.ram_gb:g} GB"),
    ]
    kind = "Jetson GPU" if machine.is_jetson else "GPU"
    rows += [(f"{kind} {i}", escape(f"{g.name} (sm_{g.compute_capability.replace('.', '')}, {g.memory_gb:g} GB)"))
             for i, g in enumerate(machine.gpus)] or [("GPU", "no NVIDIA GPU found")]
    ort = machine.onnxruntime_version and f"{machine.onnxruntime_version} ({machine.onnxruntime_package})"
    rows += [(name, escape(value or "not found")) for name, value in (
        ("driver", machine.driver_version), ("CUDA", machine.cuda_version),
        ("TensorRT", machine.tensorrt_version), ("ONNX Runtime", ort))]
    rows += [(name, _status(status)) for name, status in machine.providers.items()]
    hint = "none fits; pass --profile path/to/board.toml (see `edgekit profiles list`)"
    rows.append(("profile", f"[green]{escape(profile)}[/]" if profile else escape(hint)))
    return rows


def _status(status: str) -> str:
    if status in ("works", "listed"):
        return "[green]works[/]" if status == "works" else status
    return f"[yellow]{escape(status)}[/]"
