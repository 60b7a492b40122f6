"""Weight-only quantization at export time, one tensor at a time (``edgekit export --quant``).

The graph's weights are still recipes (``edgekit.export.lazy``) when this runs, so each
quantized tensor is computed only when the writer reaches it:

    MatMul(x, W)       ─int4/int8→ com.microsoft.MatMulNBits(x, W_q, scales, zero_points)
    Gather(E, ids)     ─int4─────→ com.microsoft.GatherBlockQuantized(E_q, ids, scales, zero_points)

The arithmetic is the build's: int4 MatMuls take :mod:`edgekit.quantize.clip` (round-to-nearest
per block over a clip-searched range; asymmetric, or with ``symmetric`` no zero points at all),
int8 ONNX Runtime's ``quantize_matmul_8bits``,
the embedding ORT's numpy Gather quantizer, so the result matches ``edgekit build --quant int4``
with RTN (except that the build's tied embedding reads the LM head's table). Past ``SEARCH_LIMIT``
MatMul weights the int4 ranges are ORT's plain RTN (``quantize_matmul_4bits``): the search would
add hours to a 27B export. A transposed
weight (every Linear) is quantized by slices of its rows, so even a 1.3 G-parameter LM head
never exists in fp32 at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# SEARCH_LIMIT: the build's. The clip search costs ~16 RTN passes in NumPy (~4 M weights/s on 2 cores):
# past that many MatMul weights (a 27B model: 1.7 h more) the export keeps ORT's plain RTN kernel.
from edgekit.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, SEARCH_LIMIT

CHUNK_BYTES = 64 << 20  # fp32 bytes of weight quantized per slice


def quantize_graph(model: Any, quant: str, block_size: int | None = None,
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL, embeddings: bool = True,
                   symmetric: bool = False) -> dict[str, Any]:
    """Rewrite ``model``'s MatMuls (and, for int4, the embedding Gather) over lazy weights; returns figures."""
    from edgekit.errors import require
    from edgekit.export.lazy import drop_unused

    require("onnxruntime", "cpu")  # its quantization kernels
    bits = 4 if quant == "int4" else 8
    block = block_size or DEFAULT_BLOCK_SIZE
    check_block_size(block)
    graph = model.graph
    matmuls = gathers = 0
    targets = _targets(graph)
    weights = sum(w.shape[0] * w.shape[1] for w in {w.name: w for node, w in targets if node.op_type == "MatMul"}.values())
    search = bits == 4 and weights <= SEARCH_LIMIT
    # A weight two nodes read (an MTP head's LM head and embedding lookup) is quantized once.
    quantized: dict[tuple[str, str], list[Any]] = {}
    for node, weight in targets:
        if node.op_type == "MatMul":
            if (node.op_type, weight.name) not in quantized:
                quantized[node.op_type, weight.name] = _matmul_weights(graph, weight, bits, block, search, symmetric)
            _replace(graph, node, "MatMulNBits", [node.inputs[0], *quantized[node.op_type, weight.name]],
                     {"K": weight.shape[0], "N": weight.shape[1], "bits": bits, "block_size": block,
                      "accuracy_level": accuracy_level})
            matmuls += 1
        elif embeddings and bits == 4 and node.attributes.get_int("axis", 0) == 0:
            if (node.op_type, weight.name) not in quantized:
                quantized[node.op_type, weight.name] = _gather_inputs(graph, weight, block, symmetric)
            data, scales, zero_points = quantized[node.op_type, weight.name]
            inputs = [data, node.inputs[1], scales] + ([zero_points] if zero_points is not None else [])
            _replace(graph, node, "GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1, "block_size": block})
            gathers += 1
    graph.opset_imports.setdefault("com.microsoft", 1)
    drop_unused(graph)
    return {"quantization": quant, "method": "rtn", "block_size": block, "accuracy_level": accuracy_level,
            "symmetric": symmetric, "clip_search": search, "quantized_matmuls": matmuls, "quantized_gathers": gathers,
            "at": "export"}


def _targets(graph: Any) -> list[tuple[Any, Any]]:
    """(node, its lazy 2-D weight) for each standard MatMul and Gather the export may quantize."""
    from edgekit.export.lazy import recipe_of

    found = []
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1] if node.op_type == "MatMul" else node.inputs[0] if node.op_type == "Gather" else None
        if weight is not None and recipe_of(weight) is not None and len(weight.shape) == 2:
            found.append((node, weight))
    return found


def check_block_size(block: int) -> None:
    """Refuse a block size MatMulNBits / GatherBlockQuantized cannot take."""
    from edgekit.errors import EdgekitError

    if block < 16 or block & (block - 1):
        raise EdgekitError(f"--block-size {block} is not a power of two >= 16", "use 32, 64 or 128")


def _replace(graph: Any, node: Any, op: str, inputs: list[Any], attrs: dict[str, Any]) -> None:
    import onnx_ir as ir

    new = ir.node(op, inputs, attrs, domain="com.microsoft", name=f"{node.name or op}_Q")
    # Keeps the output's name, shape and type, graph outputs (logits) included.
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)


class _Job:
    """One weight's quantization, computed when the first of its tensors is written, then released."""

    def __init__(self, compute):
        self.compute, self.parts, self.left = compute, None, 0

    def part(self, index: int, count: int) -> np.ndarray:
        if self.parts is None:
            self.parts, self.left = self.compute(), count
        part = self.parts[index]
        self.left -= 1
        if self.left == 0:
            self.parts = None  # all written: free the arrays (a re-read recomputes)
        return part


def _lazy_values(graph: Any, job: _Job, name: str, specs: list[tuple[str, Any, tuple[int, ...]]]) -> list[Any]:
    """Initializers for the job's outputs, registered together so the writer takes them in a row."""
    import onnx_ir as ir

    values = []
    for index, (suffix, dtype, shape) in enumerate(specs):
        def func(index=index, dtype=dtype, shape=shape, suffix=suffix):
            array = job.part(index, len(specs))
            if dtype in (ir.DataType.UINT4, ir.DataType.INT4):
                return ir.PackedTensor(array, dtype, shape=shape, name=name + suffix)
            return ir.Tensor(array, dtype=dtype, name=name + suffix)

        tensor = ir.LazyTensor(func, dtype=dtype, shape=ir.Shape(shape), name=name + suffix)
        value = ir.Value(name=name + suffix, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
        graph.register_initializer(value)
        values.append(value)
    return values


def _matmul_weights(graph: Any, weight: Any, bits: int, block: int, search: bool, symmetric: bool = False) -> list[Any]:
    """MatMulNBits' (B, scales[, zero points]) for ``weight``; symmetric: no zero points (MatMulNBits implies 8)."""
    import onnx_ir as ir

    k, n = weight.shape
    blocks = -(-k // block)
    blob = block * bits // 8
    zp_cols = -(-blocks * bits // 8)
    scale_dtype = weight.const_value.dtype
    job = _Job(lambda: _quantize_matmul(weight.const_value, bits, block, search, symmetric))
    specs = [(f".q{bits}", ir.DataType.UINT8, (n, blocks, blob)), (".scales", scale_dtype, (n, blocks))]
    if not symmetric:
        specs.append((".zero_points", ir.DataType.UINT8, (n, zp_cols)))
    return _lazy_values(graph, job, weight.name, specs)


def _quantize_matmul(tensor: Any, bits: int, block: int, search: bool, symmetric: bool = False) -> tuple[np.ndarray, ...]:
    """Blockwise RTN over column slices of the (K, N) weight -> (packed, scales, zero points); symmetric:
    (packed, scales)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    from edgekit.quantize.clip import quantize_int4

    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    k, n = tensor.shape
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), dtype=np.uint8)
    columns_of = _slicer(tensor.recipe, "columns")
    step = max(1, CHUNK_BYTES // (4 * k))
    for start in range(0, n, step):
        stop = min(n, start + step)
        columns = columns_of(start, stop).astype(np.float32)  # (K, cols)
        if search:  # the build's int4 RTN: clipped ranges (edgekit.quantize.clip)
            parts = quantize_int4(columns, block, symmetric)
            packed[start:stop], scales[start:stop] = parts[:2]
            if not symmetric:
                zero_points[start:stop] = parts[2]
            continue
        if blocks * block != k:
            columns = np.pad(columns, ((0, blocks * block - k), (0, 0)))
        columns = np.ascontiguousarray(columns)
        # Slices of the first axis are contiguous views: the kernel fills the outputs in place.
        quantize(packed[start:stop], columns, scales[start:stop], zero_points[start:stop], block, stop - start,
                 blocks * block, symmetric)
    scales = scales.astype(tensor.dtype.numpy(), copy=False)
    return (packed, scales) if symmetric else (packed, scales, zero_points)


def _slicer(recipe: Any, axis: str):
    """(start, stop) -> that slice of the weight along ``axis`` ("rows" or "columns").

    Read by source rows when the recipe allows it (a transposed parameter for columns, the
    parameter itself for rows); any other recipe is computed whole, once per weight.
    """
    if recipe.by_source_rows() == axis:
        return lambda start, stop: recipe.compute((start, stop))
    whole = recipe.compute()
    if axis == "columns":
        return lambda start, stop: whole[:, start:stop]
    return lambda start, stop: whole[start:stop]


def _gather_inputs(graph: Any, weight: Any, block: int, symmetric: bool = False) -> list[Any]:
    """The quantized table's (data, scales, zero points): GatherBlockQuantized's inputs but the indices.

    Symmetric: signed int4 data and no zero points (GatherBlockQuantized's default for int4 is 0),
    as ORT's numpy quantizer writes them."""
    import onnx_ir as ir

    rows, cols = weight.shape
    blocks = -(-cols // block)
    job = _Job(lambda: _quantize_rows(weight.const_value, block, symmetric))
    specs = [(".q4", ir.DataType.INT4 if symmetric else ir.DataType.UINT4, (rows, cols)),
             (".scales", weight.const_value.dtype, (rows, blocks))]
    if not symmetric:
        specs.append((".zero_points", ir.DataType.UINT4, (rows, blocks)))
    values = _lazy_values(graph, job, weight.name, specs)
    return values if not symmetric else [*values, None]


def _quantize_rows(tensor: Any, block: int, symmetric: bool = False) -> tuple[np.ndarray, ...]:
    """ORT's numpy int4 quantizer (blocks along the hidden axis) over row slices of the table."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    rows_of = _slicer(tensor.recipe, "rows")
    rows, cols = tensor.shape
    step = max(2, CHUNK_BYTES // (4 * cols)) // 2 * 2  # even: two int4 per byte never straddle slices
    parts: list[list[np.ndarray]] = [[], [], []]
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block_rows = rows_of(start, stop)
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: scale 0, handled by ORT's code
            data, scales, zero_points = DefaultWeightOnlyQuantizer.quantize_ndarray(
                block_rows.astype(np.float32), 1, block, symmetric)
        for part, array in zip(parts, (data, scales, zero_points)):
            part.append(array)
    scales = np.concatenate(parts[1]).astype(tensor.dtype.numpy(), copy=False)
    if symmetric:  # signed levels, no zero points
        return np.concatenate(parts[0]), scales
    return np.concatenate(parts[0]), scales, np.concatenate(parts[2])
