"""GPU precisions: the graph passes that put an engine's precision into its ONNX file.

TensorRT 11 removed the fp16 builder flag (weak typing was deprecated in 10.12), so a GPU
engine's precision lives in the graph itself (strongly typed); one file builds on TensorRT 10.3
(JetPack 6) and 11.x, and ONNX Runtime (CUDA, and CPU for quality) runs the same file.

    export (fp32 ONNX)
      ─calibrate.py: calibration_windows + matmul_input_stats (fp32; AWQ and fp8 only)→ stats
      ─weight_only.py: quantize_weight_only   int4 | int8 weight → DequantizeLinear(block) → MatMul
       or fp8.py: quantize_fp8                e4m3 Q/DQ on weights and activations (sm_89+)
      ─half.py: convert_to_half               fp16 | bf16 weights and matmuls, sensitive islands fp32
      ─save→ build folder: model.onnx (+ .data) and a sidecar recording precision and figures

    half.cpu_runnable(graph, dtype) → the graph ONNX Runtime's CPU provider executes
                                      (native fp16; bf16 emulated), for --quality on CPU

``edgekit.engines.gpu_graph`` runs the passes in that order; nothing here imports torch.
"""
