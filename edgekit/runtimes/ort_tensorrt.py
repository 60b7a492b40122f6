"""ONNX Runtime's TensorRT provider: an EP-context model, TensorRT's engine embedded, built on the GPU
from the same strongly typed GPU graph as native TensorRT."""

from edgekit.runtimes.onnxruntime_build import BF16_CACHES, OrtRuntime

RUNTIME = OrtRuntime(names=("ort-tensorrt",), provider="TensorrtExecutionProvider", device="gpu", extra="gpu",
                     context_model=True,
                     int8_form="w8a8",  # TensorRT's INT8: weights and activations (engines.plan.gpu_recipe)
                     refuses=(("bf16", BF16_CACHES, "use --runtime tensorrt for bf16, or --precision fp16"),))
