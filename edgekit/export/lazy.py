"""Graph initializers as recipes: a model parameter read on demand, then numpy steps.

The traced graph's weights have no data (the model was traced on meta tensors). Each one
becomes a ``LazyWeight`` that reads its parameter from a ``WeightSource`` when written;
constant subgraphs over a weight (the exporter's ``Transpose`` of a Linear weight, a MoE
lowering's reshapes, a ``Cast``) become more steps of the same recipe instead of folded
copies in memory. The writer evaluates one recipe at a time, so memory stays near the
largest tensor; quantization reads a transposed weight by source rows, so not even that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# Ops folded into a recipe: one weight input, the others small constants.
ELEMENTWISE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
UNARY = {"Exp": np.exp, "Neg": np.negative, "Identity": lambda a: a, "Sqrt": np.sqrt}
SHAPE_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast")


def _ir():
    import onnx_ir as ir

    return ir


@dataclass(frozen=True)
class Step:
    """One folded node: ``op`` with its attributes and constant inputs (None marks the weight)."""

    op: str
    attrs: tuple[tuple[str, Any], ...] = ()
    consts: tuple[Any, ...] = ()  # per input: None for the weight, else a numpy array

    def __call__(self, array: np.ndarray) -> np.ndarray:
        attrs = dict(self.attrs)
        if self.op == "Transpose":
            return np.transpose(array, attrs.get("perm") or tuple(reversed(range(array.ndim))))
        if self.op == "Cast":
            return array.astype(_ir().DataType(attrs["to"]).numpy(), copy=False)
        if self.op == "Reshape":
            return array.reshape(_reshape_target(array.shape, self.consts[1]))
        if self.op == "Squeeze":
            axes = self.consts[1] if len(self.consts) > 1 else None
            return np.squeeze(array, axis=None if axes is None else tuple(int(a) for a in axes))
        if self.op == "Unsqueeze":
            return np.expand_dims(array, tuple(int(a) for a in self.consts[1]))
        if self.op in UNARY:
            return UNARY[self.op](array)
        args = [array if c is None else c for c in self.consts]
        return ELEMENTWISE[self.op](*args).astype(array.dtype, copy=False)

    def key(self) -> tuple:
        return (self.op, self.attrs, tuple(None if c is None else (c.shape, c.tobytes()) for c in self.consts))


def _reshape_target(shape: tuple[int, ...], target: np.ndarray) -> tuple[int, ...]:
    dims = [shape[i] if int(d) == 0 else int(d) for i, d in enumerate(target)]  # 0 copies the input dim
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = int(np.prod(shape)) // known
    return tuple(dims)


def _out_shape(step: Step, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The step's output shape, computed without data (weights may be gigabytes)."""
    if step.op == "Reshape":
        return _reshape_target(shape, step.consts[1])
    if step.op in ("Transpose", "Squeeze", "Unsqueeze"):
        proxy = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape=shape, strides=(0,) * len(shape))
        return step(proxy).shape
    if step.op in ELEMENTWISE:
        return tuple(np.broadcast_shapes(*[shape if c is None else c.shape for c in step.consts]))
    return shape


_LAZY_CLASS: list[type] = []


def _lazy_class() -> type:
    if not _LAZY_CLASS:
        class LazyWeight(_ir().LazyTensor):
            """An onnx_ir lazy tensor that carries its ``recipe``."""

        _LAZY_CLASS.append(LazyWeight)
    return _LAZY_CLASS[0]


def make(load: Callable[[tuple[int, int] | None], np.ndarray], dtype: Any, shape: tuple[int, ...], name: str,
         steps: tuple[Step, ...] = ()):
    """An ``ir.LazyTensor`` whose value is ``load()`` followed by ``steps``, carrying its recipe."""
    ir = _ir()

    recipe = Recipe(load, steps)
    tensor = _lazy_class()(lambda: ir.Tensor(recipe.compute(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)
    tensor.recipe = recipe  # type: ignore[attr-defined]
    return tensor


@dataclass
class Recipe:
    """``load(rows)`` reads rows of the source parameter (None: all) as numpy; ``steps`` follow."""

    load: Callable[[tuple[int, int] | None], np.ndarray]
    steps: tuple[Step, ...] = ()

    def compute(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        array = self.load(rows)
        for step in self.steps:
            array = step(array)
        return np.ascontiguousarray(array)

    def by_source_rows(self) -> str | None:
        """How rows of the source map to the result: "rows" (same rows), "columns" (transposed 2-D), or None."""
        ops = [s.op for s in self.steps if s.op not in ("Cast", "Identity")]
        if not ops:
            return "rows"
        if ops == ["Transpose"]:
            perm = dict(next(s for s in self.steps if s.op == "Transpose").attrs).get("perm")
            return "columns" if perm in (None, (1, 0)) else None
        return None


def recipe_of(value: Any) -> Recipe | None:
    """The recipe of an ir.Value's constant, if it is a lazy weight."""
    tensor = getattr(value, "const_value", None) if value is not None else None
    return getattr(tensor, "recipe", None)


def fold(model: Any) -> int:
    """Fold every node computing on one lazy weight and small constants into a new lazy weight.

    Returns the number of folded nodes; weights left without uses are dropped.
    """
    ir = _ir()
    graph = model.graph
    made: dict[tuple, Any] = {}
    folded = 0
    for node in list(graph):
        step, weight = _as_step(node)
        if step is None:
            continue
        tensor = weight.const_value
        out = node.outputs[0]
        key = (tensor.name, step.key())
        if key not in made:
            recipe: Recipe = tensor.recipe
            shape = _out_shape(step, tuple(tensor.shape))
            dtype = ir.DataType(dict(step.attrs)["to"]) if step.op == "Cast" else tensor.dtype
            name = f"{tensor.name}.{step.op.lower()}"
            lazy = make(recipe.load, dtype, shape, name, recipe.steps + (step,))
            value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=lazy)
            graph.register_initializer(value)
            made[key] = value
        out.replace_all_uses_with(made[key])
        graph.remove(node, safe=True)
        folded += 1
    drop_unused(graph)
    return folded


def _as_step(node: Any) -> tuple[Step | None, Any]:
    """(Step, the weight input) when ``node`` folds into a recipe, else (None, None)."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None, None
    if node.op_type not in ELEMENTWISE and node.op_type not in UNARY and node.op_type not in SHAPE_OPS:
        return None, None
    weights = [v for v in node.inputs if recipe_of(v) is not None]
    if len(weights) != 1:
        return None, None
    consts = []
    for value in node.inputs:
        if value is weights[0]:
            consts.append(None)
            continue
        array = _small_constant(value)
        if array is None:
            return None, None
        consts.append(array)
    attrs = tuple(sorted((k, _attr_value(a)) for k, a in node.attributes.items()))
    if node.op_type in ELEMENTWISE and int(np.prod([c.size for c in consts if c is not None] or [1])) > 1 << 16:
        return None, None
    return Step(node.op_type, attrs, tuple(consts)), weights[0]


def _small_constant(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None or getattr(tensor, "recipe", None) is not None or tensor.size > 1 << 16:
        return None
    return tensor.numpy()


def _attr_value(attr: Any) -> Any:
    value = attr.value
    return tuple(value) if isinstance(value, (list, tuple)) else value


def drop_unused(graph: Any) -> None:
    """Remove initializers nothing reads (e.g. a weight whose only use was folded)."""
    outputs = {v.name for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        if not value.uses() and name not in outputs:
            del graph.initializers[name]


def is_lazy_input(node: Any) -> bool | None:
    """For onnxscript's optimizer: never fold (materialize) a node reading a lazy weight."""
    return False if any(recipe_of(v) is not None for v in node.inputs) else None
