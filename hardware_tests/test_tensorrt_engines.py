"""Native TensorRT engines end to end, as a user drives them: `edgekit build --runtime tensorrt`,
then `edgekit run`, `edgekit bench` and a bundle of weight-stripped plans plus the export.

Skips where TensorRT, cuda-python or a GPU is missing (the fixtures in conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys


def edgekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600)


def test_build_run_and_bench_a_native_plan(run_tokens, small_profile, export_of, tmp_path):
    export = export_of("tiny-qwen3")
    out = tmp_path / "trt"
    built = edgekit("build", str(export), "--profile", str(small_profile), "--runtime", "tensorrt",
                    "--precision", "fp32", "-o", str(out))
    assert built.returncode == 0, built.stderr[-3000:]
    on_gpu, on_cpu = run_tokens(out), run_tokens(export)
    assert on_gpu["runtime"].startswith("TensorRT"), on_gpu["runtime"]  # not a silent CPU fallback
    assert on_gpu["token_ids"] == on_cpu["token_ids"]
    bench = edgekit("bench", str(out), "--prompt-lengths", "16", "--new-tokens", "16", "--runs", "2", "--json")
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads(bench.stdout)
    print(json.dumps(report, indent=1)[:4000])


def test_a_bundle_of_stripped_plans_holds_the_weights_once(run_tokens, small_profile, export_of, tmp_path):
    export = export_of("tiny-qwen3")
    stripped = tmp_path / "stripped"
    built = edgekit("build", str(export), "--profile", str(small_profile), "--runtime", "tensorrt",
                    "--precision", "fp32", "--strip-weights", "-o", str(stripped))
    assert built.returncode == 0, built.stderr[-3000:]
    bundle = tmp_path / "model.edgepkg"
    packed = edgekit("package", str(stripped), str(export), "-o", str(bundle))
    assert packed.returncode == 0, packed.stderr[-3000:]
    full = tmp_path / "full"
    assert edgekit("build", str(export), "--profile", str(small_profile), "--runtime", "tensorrt",
                   "--precision", "fp32", "-o", str(full)).returncode == 0
    weights = sum(p.stat().st_size for p in export.glob("model.onnx*"))
    plan, full_plan = (stripped / "model.plan").stat().st_size, (full / "model.plan").stat().st_size
    assert plan < full_plan - 0.5 * weights  # the weights are not in the stripped plan
    # One copy of the weights (the export's) beside plans that hold none; on a tiny model the
    # plan's own kernels are not small next to the weights, so they are counted apart.
    assert bundle.stat().st_size <= 1.15 * weights + plan
    on_gpu = run_tokens(bundle, "--profile", small_profile.stem)
    assert on_gpu["runtime"].startswith("TensorRT")
    assert on_gpu["token_ids"] == run_tokens(export)["token_ids"]
