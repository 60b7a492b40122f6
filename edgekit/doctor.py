"""What this machine is, what of it really works, and which hardware profile fits it.

``detect()`` never raises: anything it cannot find or import becomes ``None``, an empty tuple or
a reason string. No vendor SDK (pynvml, onnxruntime, tensorrt) is imported at module level, and
torch never, so ``edgekit doctor`` runs on a bare device.

onnxruntime-gpu lists the CUDA and TensorRT providers whether or not a GPU or its libraries are
there, and silently falls back to the CPU when they fail, so the hardware is detected on its own
and each GPU provider is tried on a tiny shipped model (``edgekit/data/identity.onnx``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IDENTITY_ONNX = Path(__file__).parent / "data" / "identity.onnx"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
NO_GPU = "listed by onnxruntime-gpu, but no NVIDIA GPU was found"
PROBE_TIMEOUT_S = 120  # the TensorRT provider builds an engine, which takes a while on a Jetson
# Jetson GPUs by the device-tree model name; NVML, which would tell, does not exist there.
JETSON_COMPUTE = (("Orin", "8.7"), ("Xavier", "7.2"), ("TX2", "6.2"), ("Nano", "5.3"), ("TX1", "5.3"))
# arm64 /proc/cpuinfo names no model, only an implementer 0x41 (Arm) "CPU part".
ARM_PARTS = {"0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1",
             "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}
ARM_FLAG_PREFIXES = ("asimd", "sve", "neon")
# ISA extensions, older first. A CPU with a later one has the earlier ones, so the CPU profile that
# asks for the latest extension is the most specific fit; counting flags cannot tell ["avx2", "fma"]
# from ["avx512f", "avx512_vnni"]. x86 and Arm never compete (profiles are filtered by arch first).
ISA_ORDER = ("sse4_2", "avx", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU (on a Jetson: the integrated one, whose memory is the shared RAM)."""

    name: str
    compute_capability: str  # "8.7"
    memory_gb: float


@dataclass(frozen=True)
class Machine:
    """This machine as edgekit sees it; every version is None when not found."""

    cpu_model: str
    arch: str  # platform.machine(): "x86_64" / "aarch64"
    cpu_flags: tuple[str, ...]  # sorted, spelt as /proc/cpuinfo does ("avx512_vnni", "asimddp")
    cores: int
    ram_gb: float
    gpus: tuple[Gpu, ...]
    is_jetson: bool
    driver_version: str | None
    cuda_version: str | None
    tensorrt_version: str | None
    onnxruntime_version: str | None
    onnxruntime_package: str | None  # "onnxruntime" or "onnxruntime-gpu"
    providers: dict[str, str]  # provider -> "works", "listed" (not tried) or why it does not work

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, GPUs dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def detect() -> Machine:
    """Look at this machine: CPU, RAM, GPUs, driver and runtime versions, working providers."""
    cpu_model, flags = _cpu()
    ram = _ram_gb()
    jetson = _jetson_model()
    if jetson is not None:
        gpus, driver, cuda = _jetson_gpu(jetson, ram)
    else:
        gpus, driver, cuda = _nvml() or _nvidia_smi() or ((), None, None)
    ort_version, ort_package, providers = _onnxruntime(bool(gpus))
    return Machine(
        cpu_model=cpu_model, arch=platform.machine(), cpu_flags=flags, cores=_cores(), ram_gb=ram,
        gpus=gpus, is_jetson=jetson is not None, driver_version=driver, cuda_version=cuda,
        tensorrt_version=_tensorrt_version(), onnxruntime_version=ort_version,
        onnxruntime_package=ort_package, providers=providers,
    )


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "")  # device-tree strings end in NUL
    except OSError:
        return ""


def _cpu() -> tuple[str, tuple[str, ...]]:
    """(model, sorted ISA flags) from the first processor block of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = tuple(sorted(set((fields.get("flags") or fields.get("Features") or "").split())))
    model = fields.get("model name") or ARM_PARTS.get(fields.get("CPU part", "").lower(), "")
    return model or platform.processor() or "unknown", flags


def _cores() -> int:
    # The cores this process may run on (a container's share), which is what thread counts need.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ram_gb() -> float:
    match = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    try:
        total = int(match.group(1)) * 1024 if match else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return round(total / 2**30, 2)


def _jetson_model() -> str | None:
    """The board's name on a Jetson ("NVIDIA Jetson AGX Orin Developer Kit"), else None."""
    model = _read("/proc/device-tree/model").strip()
    if "Jetson" in model:
        return model
    return (model or "NVIDIA Jetson") if Path("/etc/nv_tegra_release").exists() else None


def _jetson_gpu(model: str, ram_gb: float) -> tuple[tuple[Gpu, ...], str | None, str | None]:
    compute = next((cc for key, cc in JETSON_COMPUTE if key in model), None)
    gpus = (Gpu(model, compute, ram_gb),) if compute else ()
    # The L4T release stands in for the driver version: the GPU driver ships inside it.
    release = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", _read("/etc/nv_tegra_release"))
    driver = f"L4T R{release.group(1)}.{release.group(2)}" if release else None
    cuda = _quietly(lambda: json.loads(_read("/usr/local/cuda/version.json"))["cuda"]["version"])  # "12.6.68"
    return gpus, driver, ".".join(cuda.split(".")[:2]) if cuda else None


def _nvml() -> tuple[tuple[Gpu, ...], str | None, str | None] | None:
    """GPUs and versions through NVML (package nvidia-ml-py), or None when NVML is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, or no driver: both mean "ask nvidia-smi"
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        gpus = tuple(_nvml_gpu(pynvml, handle) for handle in handles)
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # 12040 means 12.4
        return gpus, driver, f"{cuda // 1000}.{cuda % 1000 // 10}"
    except Exception:
        return None
    finally:
        _quietly(pynvml.nvmlShutdown)


def _quietly(call: Any) -> Any:
    try:
        return call()
    except Exception:
        return None


def _nvml_gpu(pynvml: Any, handle: Any) -> Gpu:
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    return Gpu(_text(pynvml.nvmlDeviceGetName(handle)), f"{major}.{minor}", round(memory / 2**30, 2))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # nvidia-ml-py < 11.5 returns bytes


def _nvidia_smi() -> tuple[tuple[Gpu, ...], str | None, str | None] | None:
    """GPUs and versions from nvidia-smi, or None when it is missing or fails."""
    query = "--query-gpu=name,compute_cap,memory.total,driver_version"
    out = _run(["nvidia-smi", query, "--format=csv,noheader,nounits"])
    if not out:
        return None
    try:
        rows = [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]
        gpus = tuple(Gpu(name, cc, round(float(mib) / 1024, 2)) for name, cc, mib, _ in rows)
    except ValueError:  # an old driver without compute_cap, or a changed format
        return None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]) or "")
    return gpus, rows[0][3] if rows else None, cuda.group(1) if cuda else None


def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _dist_version(*names: str) -> tuple[str, str] | None:
    """(distribution, version) of the first of ``names`` that is installed."""
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _tensorrt_version() -> str | None:
    found = _dist_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-lean")
    # JetPack installs the bindings with apt, without package metadata: ask the module itself.
    return found[1] if found else _quietly(lambda: str(__import__("tensorrt").__version__))


def _onnxruntime(has_gpu: bool) -> tuple[str | None, str | None, dict[str, str]]:
    """(version, distribution, provider -> status); the GPU providers are tried for real."""
    dist, version = _dist_version("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml",
                                  "onnxruntime-openvino", "onnxruntime-qnn") or (None, None)
    try:
        import onnxruntime

        listed = onnxruntime.get_available_providers()
    except Exception:  # not installed, or a broken install (onnxruntime and -gpu over each other)
        return version, dist, {}
    return str(onnxruntime.__version__), dist, {name: _provider_status(name, has_gpu) for name in listed}


def _provider_status(name: str, has_gpu: bool) -> str:
    if name == "CPUExecutionProvider":
        return "works"
    if name not in GPU_PROVIDERS:
        return "listed"
    return probe_provider(name) if has_gpu else NO_GPU


_PROBE = """
import sys, warnings
warnings.simplefilter("ignore")
import numpy as np, onnxruntime as ort
provider, model = sys.argv[1:3]
ort.set_default_logger_severity(4)


def answer(text):
    print(text)
    sys.exit()


if provider not in ort.get_available_providers():
    answer("this onnxruntime build does not include it")
x = np.arange(4, dtype=np.float32).reshape(1, 4)
try:
    session = ort.InferenceSession(model, providers=[provider])
    used = session.get_providers()[0]
    ok = used == provider and (session.run(None, {"x": x})[0] == x).all()
except Exception as exc:  # a CUDA build without kernels for this GPU fails here, not at import
    answer(f"it failed on a one-node model: {(str(exc).strip().splitlines() or [repr(exc)])[0]}")
if used != provider:
    answer(f"onnxruntime fell back to {used}: the provider's libraries (CUDA, cuDNN, TensorRT) did not load")
answer("works" if ok else "it ran, but returned wrong values")
"""


def probe_provider(name: str) -> str:
    """Open and run identity.onnx on provider ``name``: "works", or the reason it does not.

    In a child process, so that a provider library that crashes or prints cannot take the
    caller with it.
    """
    if not IDENTITY_ONNX.is_file():
        return f"not tried: {IDENTITY_ONNX} is missing from this install"
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE, name, str(IDENTITY_ONNX)],
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"opening a session did not finish within {PROBE_TIMEOUT_S} s"
    except OSError as exc:
        return f"could not start the probe ({exc})"
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    if result.returncode != 0 or not lines:
        return f"the probe failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}"
    return lines[-1]


def fitting_profile(machine: Machine, profiles: list | None = None) -> str | None:
    """The shipped (or given) profile that fits ``machine`` best, or None.

    With a GPU: the profiles of its kind ("jetson" on a Jetson, else "gpu") and compute capability,
    judged on the first GPU. A profile whose name's words all appear in the GPU's name wins
    ("NVIDIA L4" -> l4), then the closest memory size, then name order; so an unnamed 24 GB sm_89
    card gets "l4" over "rtx-4090". Without a GPU: the CPU profile of this architecture whose
    flags this CPU all has and which asks for the latest ISA extension (AVX-512 VNNI over AVX2),
    then for the most flags, then name order.
    """
    if profiles is None:
        from edgekit.profiles import list_profiles

        profiles = list_profiles()
    return _gpu_profile(machine, profiles) if machine.gpus else _cpu_profile(machine, profiles)


def _gpu_profile(machine: Machine, profiles: list) -> str | None:
    gpu, device = machine.gpus[0], "jetson" if machine.is_jetson else "gpu"
    same = [p for p in profiles
            if p.device == device and p.hardware.get("compute_capability") == gpu.compute_capability]
    words = set(re.findall(r"[a-z0-9]+", gpu.name.lower()))

    def rank(p) -> tuple:
        return not set(p.name.split("-")) <= words, abs(p.hardware["memory_gb"] - gpu.memory_gb), p.name

    return min(same, key=rank).name if same else None


def _cpu_profile(machine: Machine, profiles: list) -> str | None:
    have, arch = set(machine.cpu_flags), _arch_family(machine.arch)
    fits = [p for p in profiles if p.device == "cpu" and set(p.hardware["cpu_flags"]) <= have
            and _flags_family(p.hardware["cpu_flags"]) == arch]
    return min(fits, key=_cpu_rank).name if fits else None


def _cpu_rank(profile) -> tuple:
    flags = profile.hardware["cpu_flags"]
    latest = max((ISA_ORDER.index(f) for f in flags if f in ISA_ORDER), default=-1)
    return -latest, -len(flags), profile.name


def _arch_family(arch: str) -> str:
    arch = arch.lower()
    return "arm" if arch.startswith(("aarch64", "arm")) else "x86" if arch in ("x86_64", "amd64", "i686") else arch


def _flags_family(flags: list[str]) -> str:
    # Profiles name no architecture; Arm's flags (asimd*, sve*) share no name with x86's.
    return "arm" if any(f.startswith(ARM_FLAG_PREFIXES) for f in flags) else "x86"


def missing_requirements(requirements: dict[str, Any], machine: Machine) -> list[str]:
    """What ``machine`` lacks of ``requirements`` (keys: device, cpu_flags, compute_capability,
    tensorrt, onnxruntime_provider; all optional), one sentence each; empty when it fits.

    An unknown key is reported rather than skipped: it was written by a newer edgekit, and
    passing it unchecked could promise a fit that is not there.
    """
    checks = {"device": _need_device, "cpu_flags": _need_flags, "compute_capability": _need_compute,
              "tensorrt": _need_tensorrt, "onnxruntime_provider": _need_provider}
    missing = []
    for key, value in requirements.items():
        check = checks.get(key)
        problem = check(value, machine) if check else f"unknown requirement {key!r} (written by a newer edgekit?)"
        if problem:
            missing.append(problem)
    return missing


def _need_device(device: str, machine: Machine) -> str | None:
    if device == "cpu" or (device == "jetson" and machine.is_jetson):
        return None
    if device == "jetson":
        return "needs a Jetson, and this machine is not one"
    if device != "gpu":
        return f"needs device {device!r}, which edgekit does not know (cpu, gpu or jetson)"
    if machine.is_jetson:
        return "needs a discrete NVIDIA GPU, found a Jetson"
    return None if machine.gpus else "needs an NVIDIA GPU, found none"


def _need_flags(flags: list[str], machine: Machine) -> str | None:
    lacking = [f for f in flags if f not in machine.cpu_flags]
    return f"needs CPU flags {', '.join(lacking)}, which this CPU lacks" if lacking else None


def _need_compute(capability: str, machine: Machine) -> str | None:
    # "8.9": that architecture exactly (a plan's kernels are built for it); ">=8.0": a floor (a
    # TensorRT plan built hardware-compatible for Ampere and newer).
    capability = str(capability)
    floor = _version_tuple(capability[2:]) if capability.startswith(">=") else None
    if any(_version_tuple(g.compute_capability) >= floor if floor else g.compute_capability == capability
           for g in machine.gpus):
        return None
    found = ", ".join(f"{g.compute_capability} ({g.name})" for g in machine.gpus) or "none"
    wanted = f"{capability[2:]} or newer" if floor else capability
    return f"needs an NVIDIA GPU of compute capability {wanted}, found {found}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


def _need_tensorrt(version: str, machine: Machine) -> str | None:
    # A built engine loads only on the TensorRT that built it, so match the components given:
    # "10.3" accepts 10.3.0.30 but neither 10.0 nor 10.4. Before a build, ">=10.3" is a floor.
    found = machine.tensorrt_version
    version = str(version)
    if version.startswith(">="):
        floor = tuple(int(p) for p in version[2:].split("."))
        if found and tuple(int(p) for p in found.split(".")[: len(floor)] if p.isdigit()) >= floor:
            return None
        return f"needs TensorRT {version[2:]} or newer, found {found or 'none'}"
    if found and found.split(".")[: len(version.split("."))] == version.split("."):
        return None
    return f"needs TensorRT {version}, found {found or 'none'}"


def _need_provider(provider: str, machine: Machine) -> str | None:
    status = machine.providers.get(provider)
    if status in ("works", "listed"):  # "listed": a provider doctor does not try (not a GPU one)
        return None
    if status is None and not machine.providers:
        return f"needs {provider}, but onnxruntime is not installed"
    if status is None:
        return f"needs {provider}, which {machine.onnxruntime_package or 'onnxruntime'} does not provide here"
    return f"needs {provider}, which does not work here: {status}"
