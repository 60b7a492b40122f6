"""ONNX Runtime's CUDA provider: the ``ort`` graph as exported (GroupQueryAttention)."""

from edgekit.runtimes.onnxruntime_build import OrtRuntime

RUNTIME = OrtRuntime(names=("ort-cuda",), provider="CUDAExecutionProvider", device="gpu", extra="gpu", target="ort")
