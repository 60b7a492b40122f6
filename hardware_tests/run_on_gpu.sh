#!/usr/bin/env bash
# Run every hardware test this CUDA machine allows, in under 8 minutes, and print each skip with
# its reason (what is missing here: TensorRT, onnxruntime-gpu, cuda-python, the export stack).
#
#   hardware_tests/run_on_gpu.sh [--profile NAME] [more pytest arguments]
#
# Offline by design: edgekit runs from this working tree through PYTHONPATH (nothing is
# installed, nothing downloaded). PYTHON picks the interpreter (default: python3).
# Without --profile: the shipped GPU profile that fits this GPU, else l4. -rsP: every skip with its
# reason, and the output of passed tests (the decode bench prints its TTFT / TPOT; the precision
# tests print their quality figures).
#
# The suites: test_gpu_builds.py (ONNX Runtime CUDA / TensorRT EP builds), test_tensorrt_session.py
# and test_tensorrt_engines.py (native plans, bundles), test_precisions.py (each GPU precision built
# for the profile and run here: fp16 / bf16 greedy parity, int4 / fp8 quality, a stripped int4 plan
# refitted from its build folder's graph, ort-cuda fp16 / int4 / int8). ONLY=precisions runs that one.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EDGEKIT_CACHE=${EDGEKIT_CACHE:-$(mktemp -d /tmp/edgekit-hw.XXXXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONDONTWRITEBYTECODE=1
BUDGET_S=${BUDGET_S:-450}  # pytest's share of the 8 minutes; the probes take seconds

echo "== machine"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: not found (no NVIDIA driver here?)"
"$PY" --version

echo "== what this machine has (each missing piece skips the tests that need it)"
"$PY" - <<'EOF'
import importlib, importlib.util

def version(module):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install (missing CUDA libraries)
        return f"missing ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return getattr(mod, "__version__", "installed")

missing = [m for m in ("numpy", "typer", "rich", "tokenizers", "jinja2") if importlib.util.find_spec(m) is None]
rows = [
    ("edgekit deps", "missing: " + ", ".join(missing) if missing else "all present"),
    ("pytest", version("pytest")),
    ("tensorrt", version("tensorrt")),
    ("cuda-python", version("cuda.bindings") if importlib.util.find_spec("cuda") else "missing"),
    ("onnxruntime", version("onnxruntime")),
    ("torch", version("torch")),
    ("transformers", version("transformers")),
    ("onnx", version("onnx")),
    ("onnxscript", version("onnxscript")),
    ("cupy", version("cupy")),
]
try:
    import onnxruntime
    rows.append(("ORT providers", ", ".join(onnxruntime.get_available_providers())))
except Exception:
    pass
try:
    import torch
    rows.append(("torch CUDA", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"))
except Exception:
    pass
for name, value in rows:
    print(f"  {name:14} {value}")
EOF

if ! "$PY" -c "import pytest, edgekit.doctor" 2>/dev/null; then
  echo "error: cannot run the hardware tests here: pytest or edgekit's own dependencies are missing (listed above)"
  echo "hint: install them offline from a wheelhouse:" \
       "$PY -m pip install --no-index --find-links WHEELS pytest numpy typer rich tokenizers jinja2"
  exit 1
fi

ARGS=("$@")
if [[ " $* " != *" --profile "* && " $* " != *" --profile="* ]]; then
  PROFILE=$("$PY" - 2>/dev/null <<'EOF' || echo l4
from edgekit.doctor import detect, fitting_profile
from edgekit.profiles import load_profile
name = fitting_profile(detect())
print(name if name and load_profile(name).is_gpu else "l4")  # a CPU profile fits any machine
EOF
)
  echo "== profile: $PROFILE (pass --profile NAME to choose)"
  ARGS+=(--profile "$PROFILE")
fi

echo "== hardware tests (at most ${BUDGET_S}s)"
TESTS=hardware_tests
[ -n "${ONLY:-}" ] && TESTS="hardware_tests/test_${ONLY}.py"
timeout -k 10 "$BUDGET_S" "$PY" -m pytest "$TESTS" -q -rsP -p no:cacheprovider "${ARGS[@]}"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "error: the hardware tests ran past ${BUDGET_S}s and were stopped"
fi
exit "$rc"
