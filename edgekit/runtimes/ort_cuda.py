"""ONNX Runtime's CUDA provider: the GPU graph made from the ``ort`` export (GroupQueryAttention).

fp16 / int4 / int8 come from the graph (``edgekit.engines.gpu_graph``); int4 / int8 weights are
DequantizeLinear(block) → MatMul, which ONNX Runtime fuses into MatMulNBits (fp16 scales) on CUDA.
"""

from edgekit.runtimes.onnxruntime_build import BF16_CACHES, OrtRuntime

# What ONNX Runtime's CUDA provider gets no build for, and why (docs/precisions.md).
REFUSES = (
    ("fp8", ("its CUDA EP executes fp8 QuantizeLinear / DequantizeLinear only as standalone kernels around "
             "fp16 MatMuls (it has no fp8 GEMM), so an fp8 graph runs slower than fp16 there"),
     "use --runtime tensorrt for fp8, or --precision fp16 / int8 / int4"),
    ("bf16", BF16_CACHES, "use --runtime tensorrt for bf16, or --precision fp16"),
)

RUNTIME = OrtRuntime(names=("ort-cuda",), provider="CUDAExecutionProvider", device="gpu", extra="gpu", target="ort",
                     refuses=REFUSES)
