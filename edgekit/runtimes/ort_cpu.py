"""ONNX Runtime's CPU provider: the graph optimized once and saved, weight-only int4/int8."""

from edgekit.runtimes.onnxruntime_build import OrtRuntime

RUNTIME = OrtRuntime(names=("ort-cpu",), provider="CPUExecutionProvider", device="cpu", extra="cpu",
                     optimize=True, weight_quantization=("int8", "int4"), edits_graph=True)
