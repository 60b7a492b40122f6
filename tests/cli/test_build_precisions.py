"""`edgekit build` with GPU precisions, as printed: refusals (error / hint, exit 1) and a --graph-only
build with its quality measured on ONNX Runtime CPU."""

from __future__ import annotations

import json

from edgekit.export.presets import TRAINED
from tests.cli.test_cli import edgekit

HELDOUT = TRAINED["tiny-code"] / "heldout.txt"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_refusals_as_printed(exported, tmp_path):
    path = str(exported("Qwen3ForCausalLM", "decomposed"))
    fp8 = edgekit("build", path, "--profile", "jetson-orin-nano-8gb", "--runtime", "tensorrt", "--precision", "fp8",
                  "--dry-run")
    assert fp8.returncode == 1 and fp8.stdout == ""
    lines = fp8.stderr.strip().splitlines()
    assert lines[0] == ("error: precision fp8 is not supported by jetson-orin-nano-8gb "
                        "(compute capability 8.7; FP8 needs compute capability 8.9+)")
    assert lines[1] == "hint: use one of: fp32, fp16, int8, int4" and "Traceback" not in fp8.stderr
    int8 = edgekit("build", path, "--profile", "jetson-orin-nano-8gb", "--runtime", "tensorrt", "--precision", "int8",
                   "--dry-run")
    text = _one_line(int8.stderr)
    assert int8.returncode == 1 and text.startswith("error: TensorRT int8 (W8A8) needs calibration text")
    assert "hint: pass --calibration TEXTFILE" in text
    both = edgekit("build", path, "--profile", "l4", "--precision", "int4", "--graph-only", "--dry-run")
    assert both.returncode == 1 and "error: --graph-only and --dry-run contradict" in both.stderr
    no_text = edgekit("build", path, "--profile", "l4", "--precision", "fp8", "-o", str(tmp_path / "b"), "--graph-only")
    assert no_text.returncode == 1 and "error: --precision fp8 needs calibration text" in no_text.stderr
    assert "hint: pass --calibration TEXTFILE" in no_text.stderr and not (tmp_path / "b").exists()


def test_dry_run_shows_the_graph_it_would_make(exported):
    path = str(exported("Qwen3ForCausalLM", "decomposed"))
    shown = edgekit("build", path, "--profile", "jetson-orin-nano-8gb", "--runtime", "tensorrt", "--precision", "int4",
                    "--dry-run", env={"COLUMNS": "100"})
    text = _one_line(shown.stdout)
    assert shown.returncode == 0, shown.stderr
    for expected in ("precision int4 (export: fp32", "quantization in the graph",
                     "graph int4 weight-only rtn, block 128, fp16 activations (embeddings fp16)",
                     "strongly typed (precision from the graph)", "TensorRT >= 10.3"):
        assert expected in text, (expected, shown.stdout)


def test_graph_only_build_as_printed(exported, tmp_path):
    path = str(exported("Qwen3ForCausalLM", "decomposed"))
    out = tmp_path / "int4"
    built = edgekit("build", path, "--profile", "l4", "--runtime", "tensorrt", "--precision", "int4", "--graph-only",
                    "-o", str(out), "--quality", str(HELDOUT), env={"COLUMNS": "200"})
    assert built.returncode == 0, built.stderr
    text = _one_line(built.stderr)  # status lines go to stderr; stdout is kept for --json
    assert f"graph written {path} → {out / 'model.onnx'} (tensorrt, int4 weight-only rtn, block 128, fp16 activations" in text
    assert "profile l4" in text and "no engine built" in text
    assert "ops: " in text and "DequantizeLinear" in text
    assert "measured on ONNX Runtime CPU, the int4 graph through cpu_runnable, against the fp32 export" in text
    sidecar = json.loads((out / "edgekit.json").read_text())["build"]
    quality = sidecar["quality"]
    assert quality["tokens"] > 1024  # the whole text, not its first 1,024 tokens
    assert f"top-1 agreement {quality['top1_agreement']:.1%}" in text and f"over {quality['tokens']} tokens" in text
    assert sidecar["graph_only"] is True and sidecar["graph"]["precision"] == "int4"
    from edgekit.bundle.manifest import Source

    assert Source(out).engine["quality"] == quality  # a bundle's manifest carries the figures
