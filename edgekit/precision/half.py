"""fp16 / bf16 graphs for GPU builds: strongly typed, with the sensitive parts kept in fp32.

``convert_to_half(proto, dtype)`` rewrites an fp32 edgekit export (any target; with or without
Q/DQ, ``MatMulNBits`` or ``GatherBlockQuantized`` weights) in place. Every float tensor becomes
``dtype`` except the *islands* below, and a ``Cast`` sits on every edge between the two, so each
tensor's type is fixed in the graph (TensorRT's strongly typed networks; TensorRT 11 has no fp16
builder flag). Weights, matmuls, the residual stream, the KV cache, the conv state and the scales
of quantized weights are half.

    value types:  fp32 node ─Cast(to half)→ half node ─Cast(to fp32)→ fp32 node
    initializers and Constants needed in both types are stored once per type, converted
    (round to nearest even, clamped to the finite range) rather than cast at run time

Islands (kept fp32; each decided per op with the error it saves, measured by
``benchmarks/half_precision_islands.py`` on tiny-code's held-out text: docs/precisions.md ("fp16 / bf16 islands")):

    norm_statistics  decomposed RMSNorm: x*x, ReduceMean, +eps, Sqrt, Div (the torch kernel's fp32
                     statistics). Fused norms (RMSNormalization / SimplifiedLayerNormalization with
                     stash_type=1, SkipSimplifiedLayerNormalization) stay half: the op computes its
                     statistics in fp32 itself ("fused_norm" puts the whole op in fp32, for measuring).
    softmax          decomposed attention: scale, softcap, mask and Softmax after the QK MatMul (both
                     attention MatMuls stay half); opset-23 Attention gets softmax_precision=1.
                     GroupQueryAttention (ort) has no such attribute: its kernels decide.
    rotary           decomposed: the cos/sin rows and the rotation arithmetic; portable: the
                     RotaryEmbedding node. GroupQueryAttention requires its tables in q's type.
    delta            the Gated DeltaNet rule (l2norm, LinearAttention or the chunked Loop) and its
                     recurrent state, which is fp32 at the graph boundary too (LayerSpec contract).
    delta_gate       the decay g = -exp(A_log) * softplus(a + dt_bias), fp32 as Hugging Face computes it.
    logits           the `logits` output stays fp32 (a Cast after the LM head; softcapping in fp32).
    lm_head_fp16     bf16 graphs only (their default): the LM head MatMul in fp16, as few bytes as
                     bf16; logits rounded to 11 mantissa bits, not 8 (tiny-code top-1 0.986 -> 0.994).
                     "lm_head" (an fp32 head with fp32 weights) measured no better: off. Both take
                     plain weights only: a quantized head keeps DQ → MatMul adjacent (TensorRT's pair).
    control_flow     always: Loop / Scan / If run in fp32 with their bodies unconverted.

Measured on tiny-code (whole held-out text, ORT CPU): fp16 top-1 0.999, bf16 0.991-0.994,
perplexity within 0.1 % on every target; the per-island table is in docs/precisions.md ("fp16 / bf16 islands").

Graph I/O: input_ids / attention_mask unchanged; past_key_values.* / present.* and past_conv.* /
present_conv.* half; past_recurrent.* / present_recurrent.* and logits fp32.

``cpu_runnable(proto, dtype)`` is the graph ONNX Runtime's CPU provider executes for ``dtype``:
fp16 is the converted graph itself (ORT CPU loads it; ops without an fp16 CPU kernel are run by
ORT in fp32 between casts it inserts, i.e. fp16 storage, fp32 arithmetic). bf16 has almost no CPU
kernels, so it is emulated by a graph derived mechanically from the bf16 graph: every bf16 tensor
becomes fp32, and every op that produces one is followed by Cast(to bf16) + Cast(to fp32), so each
tensor holds exactly the bf16 value a GPU kernel with fp32 arithmetic would store. Weights are bf16
values held in fp32 (exact). Not emulated: roundings *inside* a fused op (GroupQueryAttention's
probabilities, a MatMul's partial sums), which run in fp32.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError, InternalError
from edgekit.types import MTP_LOGITS
from edgekit.precision import _graph_types as gt
from edgekit.precision._graph_types import BFLOAT16, FIXED_FLOAT_OUTPUTS, FLOAT, FLOAT16, TYPE_BLIND, element_types

HALF_TYPES = {"fp16": FLOAT16, "bf16": BFLOAT16}
ISLANDS = ("norm_statistics", "softmax", "rotary", "delta", "delta_gate", "logits")
OPTIONAL_ISLANDS = ("fused_norm", "lm_head", "lm_head_fp16")  # for measurement; lm_head_fp16 is bf16's default
DEFAULT_ISLANDS = {"fp16": ISLANDS, "bf16": (*ISLANDS, "lm_head_fp16")}
ISLAND_TYPES = {"lm_head_fp16": FLOAT16}  # the type an island computes in, when not fp32
REASONS = {
    "norm_statistics": "mean(x^2) and rsqrt of RMSNorm in fp32, as the torch kernel computes them",
    "softmax": "attention scores, mask and softmax in fp32 (both attention MatMuls stay half)",
    "rotary": "cos/sin tables and the rotation in fp32",
    "delta": "Gated DeltaNet delta rule and recurrent state in fp32 (the state is fp32 by contract)",
    "delta_gate": "decay gate -exp(A_log)*softplus(a+dt_bias) in fp32, as Hugging Face computes it",
    "logits": "logits output fp32 (Cast after the LM head)",
    "control_flow": "Loop/Scan/If bodies are not converted: the node runs in fp32",
    "fused_norm": "fused norm ops run in fp32",
    "lm_head": "LM head MatMul and its weight in fp32",
    "lm_head_fp16": "LM head MatMul in fp16 (weights as small as bf16's): logits rounded to 11 mantissa bits, not 8",
}
FUSED_NORMS = {"RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
               "LayerNormalization", "SkipLayerNormalization"}
CONTROL_FLOW = {"Loop", "Scan", "If"}
MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "Expand",
         "Identity", "Flatten"}  # data movement: values pass through unchanged
STATE_INPUTS_FP32 = ("past_recurrent.",)
STATE_OUTPUTS_FP32 = ("present_recurrent.", "logits", MTP_LOGITS)  # the MTP head's too (export --mtp)


def convert_to_half(proto: Any, dtype: str, keep: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Convert an fp32 edgekit export graph IN PLACE to dtype ("fp16" | "bf16"), strongly typed; returns a report
    {"dtype", "kept_fp32": {op_or_node_group: reason}, "casts_inserted": n, "weights_bytes_before", "weights_bytes_after"}.

    ``keep`` names the islands (default ``DEFAULT_ISLANDS[dtype]``; see the module docstring);
    other values exist to measure what each island buys. ``proto`` must hold its weights (``onnx.load``
    with external data, the default).
    """
    if dtype not in HALF_TYPES:
        raise EdgekitError(f"half precision {dtype!r} is not one of fp16, bf16", "pass fp16 or bf16")
    keep = DEFAULT_ISLANDS[dtype] if keep is None else tuple(keep)
    if dtype == "fp16":
        keep = tuple(k for k in keep if k != "lm_head_fp16")
    unknown = set(keep) - set(ISLANDS) - set(OPTIONAL_ISLANDS)
    if unknown:
        raise InternalError(f"unknown fp32 islands {sorted(unknown)}; known: {ISLANDS + OPTIONAL_ISLANDS}")
    graph = proto.graph
    gt.check_weights_loaded(graph)
    if any(i.data_type in (FLOAT16, BFLOAT16) for i in graph.initializer):
        raise EdgekitError(f"the {dtype} graph is made from an fp32 export; this graph already holds half weights",
                           "export with --dtype fp32 (the default) and build from that")
    before = gt.initializer_bytes(graph)
    types = element_types(graph)
    islands = _find_islands(graph, types, keep)
    modes: dict[int, int] = {}
    for name in sorted(islands, key=lambda n: ISLAND_TYPES.get(n, FLOAT) == FLOAT):  # fp32 islands win
        modes.update(dict.fromkeys(islands[name], ISLAND_TYPES.get(name, FLOAT)))
    casts = _Rewriter(graph, types, HALF_TYPES[dtype], modes).run()
    if "softmax" in keep:
        _softmax_precision(graph)
    kept = {name: f"{REASONS[name]} ({len(nodes)} nodes)" for name, nodes in islands.items() if nodes}
    if "logits" in keep:
        kept["logits"] = REASONS["logits"] + (f"; {len(islands['logits'])} nodes after it" if islands["logits"] else "")
    if "softmax" in keep and any(n.op_type == "Attention" for n in graph.node):
        kept["softmax"] = kept.get("softmax", REASONS["softmax"]) + "; Attention softmax_precision=1"
    return {"dtype": dtype, "kept_fp32": kept, "casts_inserted": casts,
            "weights_bytes_before": before, "weights_bytes_after": gt.initializer_bytes(graph)}


# -- islands -----------------------------------------------------------------------------------

class _Index:
    """Producers and consumers of each value name, by node position."""

    def __init__(self, graph: Any):
        self.nodes = list(graph.node)
        self.producer = {out: i for i, n in enumerate(self.nodes) for out in n.output if out}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers[name].append(i)

    def made_by(self, name: str, ops: set[str]) -> int | None:
        i = self.producer.get(name)
        return i if i is not None and self.nodes[i].op_type in ops else None


def _find_islands(graph: Any, types: dict[str, int], keep: tuple[str, ...]) -> dict[str, set[int]]:
    idx = _Index(graph)
    finders = {"control_flow": _control_flow, "norm_statistics": _norm_statistics, "softmax": _softmax,
               "rotary": _rotary, "delta": _delta, "delta_gate": _delta_gate, "logits": _logits,
               "fused_norm": _fused_norm, "lm_head": _lm_head, "lm_head_fp16": _lm_head}
    return {name: finders[name](idx, graph, types) for name in ("control_flow", *keep)}


def _norm_statistics(idx: _Index, graph, types) -> set[int]:
    """x*x → ReduceMean|ReduceSum → Add/Sqrt/Reciprocal → Div|Mul back onto x."""
    found: set[int] = set()
    for i, node in enumerate(idx.nodes):
        if node.op_type not in ("ReduceMean", "ReduceSum") or types.get(node.input[0]) != FLOAT:
            continue
        square = idx.made_by(node.input[0], {"Mul", "Pow"})
        if square is None:
            continue
        x = idx.nodes[square].input[0]
        if idx.nodes[square].op_type == "Mul" and idx.nodes[square].input[1] != x:
            continue
        chain, current = {square, i}, node.output[0]
        while len(idx.consumers[current]) == 1:
            j = idx.consumers[current][0]
            step = idx.nodes[j]
            if step.op_type not in ("Add", "Sqrt", "Reciprocal", "Div", "Mul"):
                break
            chain.add(j)
            if x in step.input:  # applied back onto x: the normalized value, end of the statistics
                found |= chain
                break
            current = step.output[0]
    return found


def _backward(idx: _Index, start: str, ops: set[str], types) -> set[int]:
    """Nodes producing ``start`` through a chain of float ``ops`` (stops at anything else)."""
    found, todo = set(), [start]
    while todo:
        i = idx.made_by(todo.pop(), ops)
        if i is None or i in found:
            continue
        found.add(i)
        todo += [n for n in idx.nodes[i].input if n and types.get(n) == FLOAT]
    return found


def _softmax(idx: _Index, graph, types) -> set[int]:
    found: set[int] = set()
    for i, node in enumerate(idx.nodes):
        if node.op_type == "Softmax" and types.get(node.input[0]) == FLOAT:
            found |= {i} | _backward(idx, node.input[0], {"Where", "Mul", "Div", "Tanh", "Add", "Sub"}, types)
    return found


def _rotary_tables(idx: _Index, graph) -> set[str]:
    tables = {n.input[k] for n in idx.nodes for k in (1, 2) if n.op_type == "RotaryEmbedding"}
    tables |= {n.input[k] for n in idx.nodes if n.op_type == "GroupQueryAttention" for k in (7, 8) if len(n.input) > k}
    return tables | {i.name for i in graph.initializer if i.name.startswith(("cos_", "sin_"))}


def _rotary(idx: _Index, graph, types) -> set[int]:
    """RotaryEmbedding nodes; decomposed: table rows (Gather) forward through the rotation to its Concat."""
    found = {i for i, n in enumerate(idx.nodes) if n.op_type == "RotaryEmbedding"}
    follow = {"Gather", "Unsqueeze", "Mul", "Sub", "Add", "Neg", "Reshape", "Expand"}
    todo = [i for t in _rotary_tables(idx, graph) for i in idx.consumers[t] if idx.nodes[i].op_type == "Gather"]
    while todo:
        i = todo.pop()
        if i in found:
            continue
        found.add(i)
        if idx.nodes[i].op_type == "Concat":
            continue
        for j in idx.consumers[idx.nodes[i].output[0]]:
            if idx.nodes[j].op_type in follow | {"Concat"}:
                todo.append(j)
    return found


def _delta(idx: _Index, graph, types) -> set[int]:
    return {i for i, n in enumerate(idx.nodes) if "/delta/" in n.name or n.op_type == "LinearAttention"}


def _control_flow(idx: _Index, graph, types) -> set[int]:
    """Loop / Scan / If: their bodies are not converted, so the node computes in fp32."""
    return {i for i, n in enumerate(idx.nodes) if n.op_type in CONTROL_FLOW}


GATE_OPS = {"Mul", "Where", "Softplus", "Greater", "Add", "Sub", "Exp", "Neg"}


def _delta_gate(idx: _Index, graph, types) -> set[int]:
    """The decay's cone outside the delta rule: elementwise ops back to the projection MatMul."""
    delta = _delta(idx, graph, types)
    found: set[int] = set()
    for i in delta:
        for name in idx.nodes[i].input:
            if name and idx.producer.get(name) not in delta and types.get(name) == FLOAT:
                found |= _backward(idx, name, GATE_OPS, types)
    return found


def _logits(idx: _Index, graph, types) -> set[int]:
    return _backward(idx, "logits", {"Mul", "Div", "Tanh", "Add"}, types)


def _lm_head(idx: _Index, graph, types) -> set[int]:
    """The MatMul making the logits, when its weight is a plain initializer: a quantized head
    (DequantizeLinear → MatMul) keeps the graph's type, so nothing comes between the DQ and the
    MatMul (TensorRT fuses that pair only)."""
    chain = _logits(idx, graph, types)
    weights = {i.name for i in graph.initializer}
    inputs = {n for i in chain for n in idx.nodes[i].input} | {"logits"}
    heads = [idx.producer[n] for n in inputs if n in idx.producer]
    return {i for i in heads if idx.nodes[i].op_type == "MatMul" and idx.nodes[i].input[1] in weights}


def _fused_norm(idx: _Index, graph, types) -> set[int]:
    return {i for i, n in enumerate(idx.nodes) if n.op_type in FUSED_NORMS}


def _softmax_precision(graph: Any) -> None:
    from onnx import helper

    for node in graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            del_attr(node, "softmax_precision")
            node.attribute.append(helper.make_attribute("softmax_precision", FLOAT))


def del_attr(node: Any, name: str) -> None:
    """Remove attribute ``name`` from ``node`` if present."""
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)


# -- the rewrite -------------------------------------------------------------------------------

class _Rewriter:
    """Assign each float value its new type, convert sources, insert the Casts, fix value_info."""

    def __init__(self, graph: Any, types: dict[str, int], half: int, modes: dict[int, int]):
        self.graph, self.types, self.half, self.modes = graph, types, half, modes
        self.new: dict[str, int] = {}  # value name -> type after the rewrite (float values only)
        self.inits = {i.name: i for i in graph.initializer if i.data_type == FLOAT}
        self.consts = {n.output[0]: n for n in graph.node
                       if n.op_type == "Constant" and types.get(n.output[0]) == FLOAT}
        self.made: dict[tuple[str, int], str] = {}  # (value, type) -> name of that value in that type
        self.casts = 0

    def mode(self, i: int) -> int:
        """The float type node ``i`` computes in."""
        return self.modes.get(i, self.half)

    def run(self) -> int:
        graph = self.graph
        for v in graph.input:
            if v.type.tensor_type.elem_type == FLOAT:
                self.new[v.name] = FLOAT if v.name.startswith(STATE_INPUTS_FP32) else self.half
        nodes = list(graph.node)
        for i, node in enumerate(nodes):
            if node.output and node.output[0] not in self.consts:
                self._retype_outputs(node, self.mode(i))
        self._primary_source_types(nodes)
        self._fix_outputs(nodes)
        rewritten: list[Any] = []
        for i, node in enumerate(nodes):
            if node.output and node.output[0] in self.consts:
                rewritten.append(node)  # converted in place; copies are emitted before their first consumer
                continue
            for k, name in enumerate(node.input):
                wanted = self._wanted(node, k, self.mode(i))
                if wanted is not None:
                    node.input[k] = self._as(name, wanted, rewritten)
            for sub in gt.subgraphs(node):
                self._outer_refs(sub, self.mode(i), rewritten)
            rewritten.append(node)
        rewritten += self._output_casts
        del graph.node[:]
        graph.node.extend(rewritten)
        self._fix_value_info()
        return self.casts

    def _retype_outputs(self, node: Any, mode: int) -> None:
        from onnx import helper

        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Cast" and attrs["to"].i == FLOAT:
            attrs["to"].i = mode
        if node.op_type == "ConstantOfShape" and mode != FLOAT:
            value = attrs.get("value")
            if value is None or value.t.data_type == FLOAT:
                array = gt.to_array(value.t) if value is not None else np.zeros(1, np.float32)
                del_attr(node, "value")
                node.attribute.append(helper.make_attribute("value", gt.from_array(array, mode)))
        quantizer = node.op_type in ("DequantizeLinear", "QuantizeLinear")
        if quantizer and getattr(attrs.get("output_dtype"), "i", 0) == FLOAT:
            attrs["output_dtype"].i = mode
        for k, out in enumerate(node.output):
            if out and self.types.get(out) == FLOAT and k not in FIXED_FLOAT_OUTPUTS.get(node.op_type, ()):
                self.new[out] = mode

    def _wanted(self, node: Any, k: int, mode: int) -> int | None:
        """The type input ``k`` must have, or None where it is not a float input or any type will do."""
        name = node.input[k]
        if not name or self.types.get(name) != FLOAT or node.op_type in TYPE_BLIND or node.op_type == "Cast":
            return None
        return mode

    def _primary_source_types(self, nodes: list[Any]) -> None:
        """Each float initializer / Constant is stored in the type most of its consumers want."""
        demand: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(nodes):
            for k, name in enumerate(node.input):
                if name in self.inits or name in self.consts:
                    demand[name].append(self._wanted(node, k, self.mode(i)) or FLOAT)
        for name in [*self.inits, *self.consts]:
            wants = demand.get(name, [FLOAT])
            primary = max(dict.fromkeys([self.half, *wants]), key=wants.count)  # ties: half
            if name in self.inits and name in {v.name for v in self.graph.output}:
                primary = FLOAT
            self.new[name] = primary
            self.made[(name, primary)] = name
            if primary != FLOAT:
                self._convert_source(name, primary)

    def _convert_source(self, name: str, to: int) -> None:
        if name in self.inits:
            init = self.inits[name]
            init.CopyFrom(gt.from_array(gt.to_array(init), to, name))
        else:
            value = next(a for a in self.consts[name].attribute if a.name == "value")
            value.t.CopyFrom(gt.from_array(gt.to_array(value.t), to, value.t.name))

    def _as(self, name: str, to: int, emit: list[Any]) -> str:
        """``name`` in type ``to``: itself, a converted copy of a source, or a new Cast."""
        have = self.new.get(name, self.types.get(name))
        if have == to:
            return name
        if (name, to) in self.made:
            return self.made[(name, to)]
        suffix = {FLOAT: "fp32", FLOAT16: "fp16", BFLOAT16: "bf16"}[to]
        copy = f"{name}/{suffix}"
        if name in self.inits:
            original = self.inits[name]
            source = gt.fp32_source(original, self.new[name])
            self.graph.initializer.append(gt.from_array(source, to, copy))
        elif name in self.consts:
            from onnx import helper

            value = next(a for a in self.consts[name].attribute if a.name == "value")
            array = gt.fp32_source(value.t, self.new[name])
            emit.append(helper.make_node("Constant", [], [copy], name=f"{copy}/Constant",
                                         value=gt.from_array(array, to, copy)))
        else:
            from onnx import helper

            emit.append(helper.make_node("Cast", [name], [copy], name=f"{copy}/Cast", to=to))
            self.casts += 1
        self.new[copy] = to
        self.made[(name, to)] = copy
        return copy

    def _outer_refs(self, body: Any, mode: int, emit: list[Any]) -> None:
        """Values a Loop/If body reads from this graph: cast them to the node's type, renamed inside."""
        renames = {}
        for name in gt.free_names(body):
            if self.types.get(name) == FLOAT:
                renames[name] = self._as(name, mode, emit)
        gt.rename_inputs(body, {a: b for a, b in renames.items() if a != b})

    def _fix_outputs(self, nodes: list[Any]) -> None:
        """Graph outputs get their contract type; a Cast bridges where the producer's type differs."""
        from onnx import helper

        self._output_casts = []
        for v in self.graph.output:
            if self.types.get(v.name) != FLOAT:
                continue
            wanted = FLOAT if v.name.startswith(STATE_OUTPUTS_FP32) else self.half
            have = self.new.get(v.name, FLOAT)
            if have != wanted:
                inner = f"{v.name}/{'fp32' if have == FLOAT else 'half'}"
                for node in nodes:
                    node.output[:] = [inner if o == v.name else o for o in node.output]
                    node.input[:] = [inner if o == v.name else o for o in node.input]
                self.types[inner], self.new[inner] = FLOAT, have
                self._output_casts.append(helper.make_node("Cast", [inner], [v.name], name=f"{v.name}/Cast", to=wanted))
                self.casts += 1
            self.new[v.name] = wanted

    def _fix_value_info(self) -> None:
        from onnx import helper

        graph = self.graph
        shapes = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
        for v in [*graph.input, *graph.output, *graph.value_info]:
            if v.name in self.new:
                v.type.tensor_type.elem_type = self.new[v.name]
        declared = set(shapes)
        for name, to in self.new.items():
            base = name.rsplit("/", 1)[0]
            if name not in declared and base in shapes and shapes[base].type.tensor_type.HasField("shape"):
                dims = [d.dim_value or d.dim_param or None for d in shapes[base].type.tensor_type.shape.dim]
                graph.value_info.append(helper.make_tensor_value_info(name, to, dims))


# -- what ONNX Runtime's CPU provider runs -----------------------------------------------------

def cpu_runnable(proto: Any, dtype: str) -> Any:
    """The graph ONNX Runtime CPU executes for a ``dtype`` graph (a new proto; ``proto`` is untouched).

    fp16: a copy of ``proto`` itself (ORT CPU loads every op of the converted graphs; where it lacks
    an fp16 kernel it computes in fp32 between Casts it inserts). bf16: the emulation described in
    the module docstring: bf16 tensors held in fp32, rounded to bf16 after every op that makes one.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if dtype == "fp16":
        return out
    if dtype != "bf16":
        raise EdgekitError(f"cpu_runnable: dtype {dtype!r} is not fp16 or bf16", "pass fp16 or bf16")
    _emulate_bf16(out.graph)
    return out


def _emulate_bf16(graph: Any) -> None:
    """bf16 → fp32 everywhere; Cast(to bf16) + Cast(to fp32) after each op that produced a bf16 tensor."""
    from onnx import helper

    types = element_types(graph)
    for init in graph.initializer:
        if init.data_type == BFLOAT16:
            init.CopyFrom(gt.from_array(gt.to_array(init).astype(np.float32), FLOAT, init.name))
    nodes: list[Any] = []
    for node in graph.node:
        for sub in gt.subgraphs(node):
            if any(v.type.tensor_type.elem_type == BFLOAT16 for v in [*sub.input, *sub.output, *sub.value_info]):
                raise InternalError(f"bf16 emulation does not enter {node.op_type} bodies ({node.name})")
        attrs = {a.name: a for a in node.attribute}
        if "value" in attrs and attrs["value"].t.data_type == BFLOAT16:  # Constant, ConstantOfShape
            attrs["value"].t.CopyFrom(gt.from_array(gt.to_array(attrs["value"].t).astype(np.float32), FLOAT))
            if node.op_type == "Constant":
                nodes.append(node)
                continue
        if "output_dtype" in attrs and attrs["output_dtype"].i == BFLOAT16:
            attrs["output_dtype"].i = FLOAT
        nodes.append(node)
        if node.op_type in MOVES:
            continue  # moving bf16 values leaves them bf16 values
        for k, out in enumerate(node.output):
            if out and types.get(out) == BFLOAT16:
                rounded = f"{out}/bf16"
                if node.op_type == "Cast":  # Cast(to bf16) rounds already
                    node.output[k] = rounded
                else:
                    node.output[k] = f"{out}/unrounded"
                    nodes.append(helper.make_node("Cast", [node.output[k]], [rounded], name=f"{out}/round",
                                                  to=BFLOAT16))
                nodes.append(helper.make_node("Cast", [rounded], [out], name=f"{out}/widen", to=FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.tensor_type.elem_type == BFLOAT16:
            v.type.tensor_type.elem_type = FLOAT

