"""What each fp32 island of the fp16 / bf16 graphs buys: error against fp32 with and without it.

    export (fp32) ─convert_to_half(dtype, keep=ISLANDS)──────────→ default graph ┐
                  ─convert_to_half(dtype, keep=ISLANDS - {one})──→ without it    ├─ cpu_runnable → ORT CPU
                  ─convert_to_half(dtype, keep=ISLANDS + {opt})──→ with an option┘   vs the fp32 graph

Teacher-forced over the whole held-out text of tiny-code (trained Qwen3, windows of 1024) for the
attention islands, and over the same token ids on tiny-qwen3.5 (random weights: perplexity there is
meaningless, logits error and top-1 are not) for the Gated DeltaNet islands, plus a token-by-token
decode of 128 tokens so the recurrent state crosses the graph boundary every step. Per row: max |Δ
logit|, top-1 agreement, perplexity change, mean KL (reference ‖ half).

    .venv/bin/python benchmarks/half_precision_islands.py [--work DIR] [--out results/half_precision_islands.json]

Also the helpers the tests use (``ProtoSession``, ``compare``): an ONNX proto stepped on ONNX
Runtime CPU with its caches, with no export folder around it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "edgekit" / "export" / "presets" / "tiny-code" / "heldout.txt"
WINDOW = 1024
DECODE_TOKENS = 128


class ProtoSession:
    """One sequence on ``proto`` (any target, any float types), ONNX Runtime CPU, caches fed back.

    ``reset``/``forward`` follow the engine-session contract that ``edgekit.quality.score_sessions`` takes.
    """

    def __init__(self, proto, layers, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        from edgekit.types import state_io

        self.io = state_io(layers)
        self.reset()

    def reset(self, capacity: int = 0) -> None:
        """Empty the caches (``capacity`` unused: caches are concatenated)."""
        kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.length, self.past = 0, {}
        for io in self.io:
            layer = io.layer
            shape = (1, layer.num_kv_heads, 0, layer.head_dim) if layer.has_kv else (1, *layer.states[io.part])
            self.past[io.past] = np.zeros(shape, kinds[self.inputs[io.past]])

    def forward(self, ids) -> np.ndarray:
        """Append ``ids``; their logits (S, vocab) as float32."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        self.length += ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.length), np.int64), **self.past}
        names = ["logits", *[io.present for io in self.io]]
        logits, *present = self.session.run(names, feeds)
        self.past = {io.past: value for io, value in zip(self.io, present)}
        return logits[0].astype(np.float32)


def heldout_ids(graph) -> list[int]:
    """The whole held-out text of tiny-code in the export's tokenizer."""
    from edgekit.quality import text_token_ids

    return text_token_ids(graph, HELDOUT, None)


class _Keep:
    """A session wrapper that keeps every window's logits, for the max |Δ| next to score_sessions."""

    def __init__(self, session):
        self.session, self.outputs = session, []

    def reset(self, capacity: int = 0) -> None:
        self.session.reset(capacity)

    def forward(self, ids) -> np.ndarray:
        out = self.session.forward(ids)
        self.outputs.append(out)
        return out


def compare(half: ProtoSession, reference: ProtoSession, ids: list[int], window: int = WINDOW) -> dict:
    """Teacher-forced figures of ``half`` against ``reference`` on ``ids`` in windows of ``window``."""
    from edgekit.quality import score_sessions

    got, want = _Keep(half), _Keep(reference)
    report = score_sessions(got, want, ids, window)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got.outputs, want.outputs))
    return {"max_abs_logit_diff": diff, "top1_agreement": report.top1_agreement,
            "perplexity": report.perplexity, "reference_perplexity": report.reference_perplexity,
            "perplexity_increase": report.perplexity_increase, "kl_divergence": report.kl_divergence,
            "tokens": report.tokens}


def compare_decode(half: ProtoSession, reference: ProtoSession, ids: list[int]) -> dict:
    """Token by token (every cache crosses the graph boundary each step): max |Δ logit|, top-1."""
    half.reset()
    reference.reset()
    diffs, agree = [], 0
    for token in ids:
        a, b = half.forward([token])[-1], reference.forward([token])[-1]
        diffs.append(float(np.abs(a - b).max()))
        agree += int(a.argmax() == b.argmax())
    return {"decode_max_abs_logit_diff": max(diffs), "decode_top1_agreement": agree / len(ids)}


def half_session(model_path: Path, layers, dtype: str, keep) -> tuple[ProtoSession, dict]:
    """The converted graph's CPU session and the conversion report."""
    import onnx

    from edgekit.precision.half import convert_to_half, cpu_runnable

    proto = onnx.load(str(model_path))
    report = convert_to_half(proto, dtype, keep=keep)
    return ProtoSession(cpu_runnable(proto, dtype), layers), report


def variants(dtype: str, report_default: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(label, islands) rows: the default, each island it applies removed, each option added."""
    from edgekit.precision.half import DEFAULT_ISLANDS, OPTIONAL_ISLANDS

    default = DEFAULT_ISLANDS[dtype]
    kept = report_default["kept_fp32"]
    applies = [n for n in default if n in kept and not (n == "logits" and "nodes after it" not in kept[n])]
    rows = [("default", default)]
    rows += [(f"without {name}", tuple(i for i in default if i != name)) for name in applies]
    rows += [(f"with {name}", (*default, name)) for name in OPTIONAL_ISLANDS
             if name not in default and not (dtype == "fp16" and name == "lm_head_fp16")]
    return rows


def measure(export: Path, dtype: str, decode: bool) -> list[dict]:
    import onnx

    from edgekit.precision.half import DEFAULT_ISLANDS
    from edgekit.types import ExportedGraph

    graph = ExportedGraph.load(export)
    ids = heldout_ids(graph)
    reference = ProtoSession(onnx.load(str(graph.model_path)), graph.layers)
    _, default = half_session(graph.model_path, graph.layers, dtype, DEFAULT_ISLANDS[dtype])
    rows = []
    for label, keep in variants(dtype, default):
        session, report = half_session(graph.model_path, graph.layers, dtype, keep)
        option = label.removeprefix("with ")
        if label.startswith("with ") and option not in report["kept_fp32"]:
            continue  # the option finds nothing in this graph (no fused norm in decomposed)
        row = {"target": graph.target, "dtype": dtype, "variant": label, **compare(session, reference, ids),
               "weights_bytes": report["weights_bytes_after"], "casts": report["casts_inserted"]}
        if decode:
            row.update(compare_decode(session, reference, ids[:DECODE_TOKENS]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/half-islands", help="where the fp32 exports go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "half_precision_islands.json"))
    args = parser.parse_args(argv)
    from edgekit.export import export_model

    work = Path(args.work)
    rows = []
    for preset, targets, decode in (("tiny-code", ("ort", "portable", "decomposed"), False),
                                    ("tiny-qwen3.5", ("ort", "portable"), True)):
        for target in targets:
            folder = work / f"{preset}-{target}"
            if not (folder / "edgekit.json").is_file():
                export_model(preset, folder, target=target, force=True)
            for dtype in ("fp16", "bf16"):
                rows += [{"model": preset, **row} for row in measure(folder, dtype, decode)]
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
