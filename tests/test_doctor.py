"""edgekit doctor: real detection on this (GPU-less) machine, canned vendor answers for the rest."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgekit import doctor
from edgekit.doctor import Gpu, Machine, detect, fitting_profile, missing_requirements

HAS_NVIDIA = Path("/dev/nvidia0").exists() or Path("/etc/nv_tegra_release").exists()


def machine(**changes) -> Machine:
    """A GPU-less x86 machine with AVX2, changed by ``changes``."""
    base = dict(cpu_model="test", arch="x86_64", cpu_flags=("avx", "avx2", "fma", "sse4_2"), cores=8, ram_gb=32.0,
                gpus=(), is_jetson=False, driver_version=None, cuda_version=None, tensorrt_version=None,
                onnxruntime_version="1.22.0", onnxruntime_package="onnxruntime",
                providers={"CPUExecutionProvider": "works"})
    return Machine(**{**base, **changes})


def jetson(memory_gb: float) -> Machine:
    return machine(arch="aarch64", cpu_flags=("asimd", "asimddp", "fp"), ram_gb=memory_gb, is_jetson=True,
                   gpus=(Gpu("NVIDIA Jetson Orin Developer Kit", "8.7", memory_gb),))


def _cpuinfo_field(*names: str) -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


# -- detect() on this machine -------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc")
def test_detect_reads_this_cpu():
    found = detect()
    assert set(found.cpu_flags) == set(_cpuinfo_field("flags", "Features").split())
    assert list(found.cpu_flags) == sorted(found.cpu_flags)
    assert found.arch == platform.machine()
    model = _cpuinfo_field("model name")
    if model:
        assert found.cpu_model == model
    assert found.cores >= 1


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
def test_detect_reads_this_ram():
    kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    assert detect().ram_gb == pytest.approx(kib / 2**20, rel=0.05)


@pytest.mark.skipif(HAS_NVIDIA, reason="this machine has an NVIDIA GPU")
def test_no_gpu_here_and_no_gpu_provider_claims_to_work():
    found = detect()
    assert found.gpus == () and not found.is_jetson and found.driver_version is None
    for provider in doctor.GPU_PROVIDERS:
        assert found.providers.get(provider, "absent") != "works"
    if found.onnxruntime_version:
        assert found.providers["CPUExecutionProvider"] == "works"
    if {"avx2", "fma"} <= set(found.cpu_flags) or {"asimd", "asimddp"} <= set(found.cpu_flags):
        assert fitting_profile(found) is not None


def test_detect_imports_no_torch():
    code = ("import sys; import edgekit.doctor as d; d.detect()\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch or transformers imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# -- providers: listed is not working -----------------------------------------------------------

def fake_onnxruntime(monkeypatch, providers: list[str]) -> None:
    fake = types.SimpleNamespace(__version__="1.22.0", get_available_providers=lambda: providers)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)


@pytest.mark.skipif(HAS_NVIDIA, reason="this machine has an NVIDIA GPU")
def test_gpu_providers_listed_without_a_gpu_are_reported_as_such(monkeypatch):
    fake_onnxruntime(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    providers = detect().providers
    assert providers["CUDAExecutionProvider"] == providers["TensorrtExecutionProvider"] == doctor.NO_GPU
    assert providers["CPUExecutionProvider"] == "works"


def test_gpu_providers_are_tried_for_real_when_a_gpu_is_there(monkeypatch):
    pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the probe's answer depends on the machine")
    monkeypatch.setattr(doctor, "_jetson_model", lambda: None)
    monkeypatch.setattr(doctor, "_nvml", lambda: ((Gpu("NVIDIA L4", "8.9", 22.5),), "550.54", "12.4"))
    fake_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])  # as onnxruntime-gpu lists
    status = detect().providers["CUDAExecutionProvider"]
    assert status == "this onnxruntime build does not include it"  # the child process used the real onnxruntime


def test_probe_runs_the_shipped_identity_model():
    pytest.importorskip("onnxruntime")
    assert doctor.IDENTITY_ONNX.stat().st_size < 1024
    assert doctor.probe_provider("CPUExecutionProvider") == "works"
    assert doctor.probe_provider("NoSuchExecutionProvider") != "works"


# -- vendor answers, canned ---------------------------------------------------------------------

def test_jetson_is_read_from_device_tree(monkeypatch):
    files = {
        "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
        "/etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic",
        "/usr/local/cuda/version.json": json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}),
        "/proc/cpuinfo": "processor\t: 0\nFeatures\t: fp asimd asimddp atomics\nCPU implementer\t: 0x41\n"
                         "CPU part\t: 0xd42\n\nprocessor\t: 1\n",
        "/proc/meminfo": "MemTotal:        7792000 kB\nMemFree: 1 kB\n",
    }
    monkeypatch.setattr(doctor, "_read", lambda path: files.get(str(path), "").replace("\x00", ""))
    found = detect()
    assert found.is_jetson and found.cpu_model == "Cortex-A78AE" and "asimddp" in found.cpu_flags
    assert found.gpus == (Gpu("NVIDIA Jetson Orin Nano Developer Kit", "8.7", found.ram_gb),)
    assert (found.driver_version, found.cuda_version) == ("L4T R36.4.0", "12.6")
    assert fitting_profile(found) == "jetson-orin-nano-8gb"


def test_nvidia_smi_is_parsed(monkeypatch):
    answers = {
        "--query-gpu=name,compute_cap,memory.total,driver_version": "NVIDIA L4, 8.9, 23034, 550.54.15\n",
        None: "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |\n",
    }
    monkeypatch.setattr(doctor, "_run", lambda command: answers[command[1] if len(command) > 1 else None])
    gpus, driver, cuda = doctor._nvidia_smi()
    assert gpus == (Gpu("NVIDIA L4", "8.9", 22.49),) and driver == "550.54.15" and cuda == "12.4"


def test_nvml_is_read(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 4090",
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 9),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=24564 * 2**20),
        nvmlSystemGetDriverVersion=lambda: "570.86", nvmlSystemGetCudaDriverVersion=lambda: 12080,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, driver, cuda = doctor._nvml()
    assert gpus == (Gpu("NVIDIA GeForce RTX 4090", "8.9", 23.99),) and (driver, cuda) == ("570.86", "12.8")
    assert fitting_profile(machine(gpus=gpus)) == "rtx-4090"


def test_nvml_without_a_driver_is_not_an_error(monkeypatch):
    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_driver))
    assert doctor._nvml() is None


# -- fitting_profile ----------------------------------------------------------------------------

@pytest.mark.parametrize("found, expected", [
    (jetson(7.4), "jetson-orin-nano-8gb"),  # an 8 GB board reports a little less
    (jetson(61.4), "jetson-agx-orin-64gb"),
    (machine(gpus=(Gpu("NVIDIA GeForce RTX 4090", "8.9", 23.99),)), "rtx-4090"),
    (machine(gpus=(Gpu("NVIDIA L4", "8.9", 22.49),)), "l4"),
    (machine(gpus=(Gpu("NVIDIA RTX 4000 Ada Generation", "8.9", 20.0),)), "l4"),  # a tie on 24 GB: name order
    (machine(gpus=(Gpu("Tesla T4", "7.5", 15.0),)), None),
    (machine(gpus=(Gpu("NVIDIA A100", "8.7", 8.0),)), None),  # sm_87 but not a Jetson: no "gpu" profile
    (machine(cpu_flags=("avx2", "avx512_vnni", "avx512f", "fma")), "cpu-x86-64-avx512"),
    (machine(cpu_flags=("amx_tile", "avx2", "avx512_vnni", "avx512f", "fma")), "cpu-x86-64-avx512"),
    (machine(), "cpu-x86-64"),
    (machine(cpu_flags=("avx", "sse4_2")), None),
    (machine(arch="aarch64", cpu_flags=("asimd", "asimddp", "fp")), "cpu-arm64"),
    (machine(arch="aarch64", cpu_flags=("asimd", "fp")), None),
])
def test_fitting_profile(found, expected):
    assert fitting_profile(found) == expected


def test_fitting_profile_checks_the_architecture():
    from edgekit.profiles import list_profiles

    arm = [p for p in list_profiles() if p.name == "cpu-arm64"]
    # The flags alone would fit; an x86 CPU reporting Arm flag names is not an Arm CPU.
    assert fitting_profile(machine(cpu_flags=("asimd", "asimddp")), arm) is None


# -- missing_requirements -----------------------------------------------------------------------

def test_missing_requirements_empty_when_it_fits():
    orin = jetson(61.4)
    orin = Machine(**{**orin.__dict__, "tensorrt_version": "10.3.0.30",
                      "providers": {"CUDAExecutionProvider": "works", "CPUExecutionProvider": "works"}})
    needs = {"device": "jetson", "cpu_flags": ["asimddp"], "compute_capability": "8.7", "tensorrt": "10.3",
             "onnxruntime_provider": "CUDAExecutionProvider"}
    assert missing_requirements(needs, orin) == []
    assert missing_requirements({}, machine()) == []
    assert missing_requirements({"device": "cpu", "cpu_flags": ["avx2"]}, machine()) == []
    assert missing_requirements({"tensorrt": ">=10.3"}, orin) == []
    assert missing_requirements({"compute_capability": ">=8.0"}, orin) == []  # a hardware-compatible plan
    assert missing_requirements({"compute_capability": ">=8.0"}, machine(gpus=(Gpu("H200", "9.0", 139.8),))) == []
    assert missing_requirements({"tensorrt": ">=10.15"}, Machine(**{**orin.__dict__, "tensorrt_version": "10.16.0"})) == []


@pytest.mark.parametrize("needs, found, expected", [
    ({"cpu_flags": ["avx2", "avx512_vnni"]}, machine(), "needs CPU flags avx512_vnni, which this CPU lacks"),
    ({"compute_capability": "8.9"}, machine(), "needs an NVIDIA GPU of compute capability 8.9, found none"),
    ({"compute_capability": "8.9"}, machine(gpus=(Gpu("Orin", "8.7", 8.0),)),
     "needs an NVIDIA GPU of compute capability 8.9, found 8.7 (Orin)"),
    ({"compute_capability": ">=8.0"}, machine(gpus=(Gpu("Tesla T4", "7.5", 15.0),)),
     "needs an NVIDIA GPU of compute capability 8.0 or newer, found 7.5 (Tesla T4)"),
    ({"tensorrt": "10.3"}, machine(), "needs TensorRT 10.3, found none"),
    ({"tensorrt": "10.3"}, machine(tensorrt_version="10.0.1.6"), "needs TensorRT 10.3, found 10.0.1.6"),
    ({"tensorrt": "10.3"}, machine(tensorrt_version="10.4.0"), "needs TensorRT 10.3, found 10.4.0"),
    ({"tensorrt": ">=10.15"}, machine(tensorrt_version="10.3.0.30"), "needs TensorRT 10.15 or newer, found 10.3.0.30"),
    ({"tensorrt": ">=10.3"}, machine(), "needs TensorRT 10.3 or newer, found none"),
    ({"device": "gpu"}, machine(), "needs an NVIDIA GPU, found none"),
    ({"device": "gpu"}, jetson(8.0), "needs a discrete NVIDIA GPU, found a Jetson"),
    ({"device": "jetson"}, machine(), "needs a Jetson, and this machine is not one"),
    ({"onnxruntime_provider": "CUDAExecutionProvider"},
     machine(providers={"CUDAExecutionProvider": doctor.NO_GPU, "CPUExecutionProvider": "works"}),
     f"needs CUDAExecutionProvider, which does not work here: {doctor.NO_GPU}"),
    ({"onnxruntime_provider": "CUDAExecutionProvider"}, machine(),
     "needs CUDAExecutionProvider, which onnxruntime does not provide here"),
    ({"onnxruntime_provider": "CPUExecutionProvider"}, machine(providers={}),
     "needs CPUExecutionProvider, but onnxruntime is not installed"),
    ({"dla_cores": 2}, machine(), "unknown requirement 'dla_cores' (written by a newer edgekit?)"),
])
def test_missing_requirements(needs, found, expected):
    assert missing_requirements(needs, found) == [expected]


def test_missing_requirements_lists_every_difference():
    needs = {"device": "gpu", "compute_capability": "8.9", "tensorrt": "10.0"}
    assert len(missing_requirements(needs, machine())) == 3


# -- the command --------------------------------------------------------------------------------

def test_doctor_json():
    code = "import typer; from edgekit.cli.doctor import doctor; app = typer.Typer(); app.command()(doctor); app()"
    result = subprocess.run([sys.executable, "-c", code, "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    here = detect()
    assert data["cpu_flags"] == list(here.cpu_flags) and data["gpus"] == [g.__dict__ for g in here.gpus]
    assert data["profile"] == fitting_profile(here)
    assert set(data) == set(here.to_dict()) | {"profile"}


def test_doctor_table_shows_a_gpu():
    from edgekit.cli.doctor import _rows

    rows = dict(_rows(jetson(7.4), "jetson-orin-nano-8gb"))
    assert rows["Jetson GPU 0"] == "NVIDIA Jetson Orin Developer Kit (sm_87, 7.4 GB)"
    assert rows["TensorRT"] == "not found" and "jetson-orin-nano-8gb" in rows["profile"]


def test_doctor_table_keeps_brackets_in_reasons():
    from rich.console import Console
    from rich.text import Text

    from edgekit.cli.doctor import _status

    reason = "it failed on a one-node model: [ONNXRuntimeError] : 1 : FAIL : [/]"
    console = Console(record=True, width=200)
    console.print(Text.from_markup(_status(reason)))
    assert reason in console.export_text()
