"""Write edgekit/data/identity.onnx, the tiny model `edgekit doctor` opens on each GPU provider.

Devices have onnxruntime but not the `onnx` package, so the model ships as bytes rather than
being built at run time. One Identity node on a static float32 [1, 4] input: static so that the
TensorRT provider builds an engine without shape profiles. Opset 13 / IR 7 so that older
onnxruntime builds (JetPack wheels lag behind) still load it. Deterministic output.
Run: python scripts/make_identity_onnx.py
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parents[1] / "edgekit" / "data" / "identity.onnx"


def build() -> onnx.ModelProto:
    """x: float32 [1, 4] -> Identity -> y: float32 [1, 4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="/identity")], "identity", [x], [y])
    model = helper.make_model(graph, producer_name="edgekit", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(build().SerializeToString())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
