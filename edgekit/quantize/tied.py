"""One int4 table for a tied embedding and LM head.

With tied embeddings the build's graph holds the table twice after ORT's constant folding: the
(vocab, H) embedding for the Gather, and its transpose, the LM head's (H, vocab) weight. Quantized
apart they are two int4 copies (≈ 100 MB for a 0.6B Qwen3 at block 32). MatMulNBits stores its
weight as (N = vocab, K / block, block / 2) bytes: row ``v`` is token ``v``'s embedding, blocked
along the hidden axis exactly as GatherBlockQuantized blocks a (vocab, H) table. So the Gather
can read the LM head's own bytes (ONNX Runtime genai does the same):

    Gather(E, ids) ──→ GatherBlockQuantized(B_head, ids, Reshape(scales_head), zero_points)
                       (B, S, K / block, block) ─Reshape→ (B, S, H)

The embedding then holds the LM head's numbers (asymmetric round-to-nearest per block, ORT's C++
quantizer; its numpy Gather quantizer rounds a few blocks differently: on tiny-code's held-out text
perplexity and top-1 agreement move by < 0.1%). Only the zero points are stored a second time,
unpacked (vocab x K / block bytes):
MatMulNBits packs two blocks per byte along K, GatherBlockQuantized packs along its block axis.
An 8-bit LM head (``--lm-head-bits 8``) shares the same way (one level, one zero point per byte).
A symmetric head (``--symmetric``) has no zero points: MatMulNBits implies 8 (128 at 8 bits), while
GatherBlockQuantized would take 0 for uint4 data, so the Gather gets that constant spelled out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"
PREFIX = "/edgekit/tied_embedding"


def same_table(proto: Any, gather_name: str | None, head_name: str | None) -> bool:
    """Whether the embedding Gather's table is the transpose of the (MatMul) LM head's weight."""
    if gather_name is None or head_name is None:
        return False
    nodes = {n.name: n for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    gather, head = nodes.get(gather_name), nodes.get(head_name)
    if gather is None or head is None or head.op_type != "MatMul":
        return False
    table, weight = inits.get(gather.input[0]), inits.get(head.input[1])
    return table is not None and weight is not None and is_transpose(table, weight)


def is_transpose(table: Any, weight: Any) -> bool:
    """Whether 2-D initializer ``table`` holds exactly the numbers of ``weight`` transposed (same type).

    Compared in row slices of the raw bytes where they are stored raw, so no copy of either is made.
    """
    if len(table.dims) != 2 or list(table.dims)[::-1] != list(weight.dims) or table.data_type != weight.data_type:
        return False
    a, b = _view(table), _view(weight)
    step = max(1, (16 << 20) // (a.itemsize * a.shape[1]))
    return all(np.array_equal(a[i:i + step], b[:, i:i + step].T) for i in range(0, a.shape[0], step))


def _view(tensor: Any) -> np.ndarray:
    """A tensor's numbers: a view of its raw bytes when stored raw, else ONNX's own conversion."""
    from onnx import helper, numpy_helper

    if not tensor.raw_data:
        return numpy_helper.to_array(tensor)
    return np.frombuffer(tensor.raw_data, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(
        tuple(tensor.dims))


def share_table(proto: Any, gather_name: str, head_output: str) -> bool:
    """Point the embedding Gather at the int4 LM head's weight; drop the fp32 table. In place.

    ``head_output``: the output name of the LM head's MatMulNBits (the quantizer renames nodes,
    not the values they produce). False, changing nothing, where the layouts do not line up.
    """
    from onnx import helper, numpy_helper

    nodes = {n.name: n for n in proto.graph.node}
    gather = nodes.get(gather_name)
    head = next((n for n in proto.graph.node if head_output in n.output and n.op_type == "MatMulNBits"), None)
    if gather is None or head is None or len(head.input) < 3:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    inits = {t.name: t for t in proto.graph.initializer}
    named = head.input[3] if len(head.input) > 3 else ""  # "": symmetric, no zero points
    zero_points = inits.get(named) if named else None
    if bits not in (4, 8) or k % block or (named and zero_points is None):
        return False  # a padded last block would leave padding in each gathered row; computed zero points
    blocks = k // block
    if zero_points is None:  # symmetric: MatMulNBits' implied zero point, which GatherBlockQuantized lacks (it takes 0)
        unpacked = np.full((n, blocks), 1 << (bits - 1), dtype=np.uint8)
    else:
        packed = numpy_helper.to_array(zero_points).reshape(n, -1)
        if bits == 4:
            packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
        unpacked = packed[:, :blocks]
    new_inits = [
        numpy_helper.from_array(np.ascontiguousarray(unpacked.reshape(n, blocks, 1)), f"{PREFIX}/zero_points"),
        numpy_helper.from_array(np.array([n, blocks, 1], dtype=np.int64), f"{PREFIX}/scale_shape"),
        numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{PREFIX}/row_shape"),
    ]
    new_nodes = [
        helper.make_node("Reshape", [head.input[2], f"{PREFIX}/scale_shape"], [f"{PREFIX}/scales"],
                         name=f"{PREFIX}/ScaleReshape"),
        helper.make_node("GatherBlockQuantized", [head.input[1], gather.input[1], f"{PREFIX}/scales",
                                                  f"{PREFIX}/zero_points"], [f"{PREFIX}/blocks"],
                         name=f"{PREFIX}/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                         block_size=block, bits=bits),
        helper.make_node("Reshape", [f"{PREFIX}/blocks", f"{PREFIX}/row_shape"], list(gather.output),
                         name=f"{PREFIX}/RowReshape"),
    ]
    table = gather.input[0]
    index = list(proto.graph.node).index(gather)
    proto.graph.node.remove(gather)
    for offset, node in enumerate(new_nodes):
        proto.graph.node.insert(index + offset, node)
    proto.graph.initializer.extend(new_inits)
    if not any(table in node.input for node in proto.graph.node):
        proto.graph.initializer.remove(inits[table])
    return True
