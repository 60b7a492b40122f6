"""ONNX Runtime's TensorRT provider: an EP-context model, TensorRT's engine embedded, built on the GPU."""

from edgekit.runtimes.onnxruntime_build import OrtRuntime

RUNTIME = OrtRuntime(names=("ort-tensorrt",), provider="TensorrtExecutionProvider", device="gpu", extra="gpu",
                     context_model=True, any_precision=True)
