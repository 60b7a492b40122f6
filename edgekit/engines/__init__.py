"""``build_engine``: compile an export for one hardware profile and runtime.

    ExportedGraph + Profile ─make_plan (checks, plain data)→ BuildPlan
        ─[GPU precision] gpu_graph.make_graph (any machine)→ build folder model.onnx, the graph the runtime gets
        ─runtime build (ONNX Runtime / TensorRT, on the target for GPUs)→ build folder + edgekit.json

``graph_only`` stops before the vendor call: the build folder then holds the checked GPU graph and
its sidecar (``build.graph_only``), and ``quality_text`` is measured on that graph by ONNX
Runtime's CPU provider against the fp32 export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgekit._files import atomic_dir, check_output, sha256_file
from edgekit.engines.plan import BuildPlan, BuildRefused, QuantOptions, make_plan
from edgekit.profiles import load_profile
from edgekit.quantize import Progress
from edgekit.types import DRAFT_FOLDER, SCHEMA_VERSION, SIDECAR, Engine, ExportedGraph

__all__ = ["BuildPlan", "BuildRefused", "QuantOptions", "build_engine", "environment_problems", "plan_build"]


def plan_build(export_dir: str | Path, profile: str | Path, runtime: str | None = None,
               precision: str | None = None, quant: QuantOptions | None = None,
               strip_weights: bool = False) -> BuildPlan:
    """The checked plan for building ``export_dir`` for ``profile`` (nothing is built)."""
    graph = ExportedGraph.load(export_dir)
    if graph.kind == "build":
        raise BuildRefused(f"{export_dir} is already a build (for {Engine.load(export_dir).profile})",
                           "pass the export folder it came from")
    return make_plan(graph, load_profile(profile), runtime, precision, quant, strip_weights)


def build_engine(export_dir: str | Path, profile: str | Path, out: str | Path, runtime: str | None = None,
                 precision: str | None = None, force: bool = False, quant: QuantOptions | None = None,
                 quality_text: str | Path | None = None, on_progress: Progress | None = None,
                 strip_weights: bool = False, graph_only: bool = False, draft: str | Path | None = None) -> Engine:
    """Build ``export_dir`` for ``profile`` into ``out``; returns the ``Engine``.

    ``quant`` picks weight-only quantization (default: the profile's, on CPU profiles, unless
    ``precision`` is given); it is applied to the optimized ONNX Runtime model. With
    ``quality_text`` the build's quality against the export's source model (PyTorch, fp32) is
    measured on that text and recorded in the sidecar as ``build.quality``.
    ``on_progress(what, done, total)`` follows the long steps (total 0: a step of unknown length).
    ``graph_only`` (GPU profiles): write and check the graph the runtime would get, without it.
    ``draft``: an export or build of a smaller model with the same tokenizer, copied into the build's
    ``draft/`` (``run`` / ``serve --speculative draft`` use it; bundles carry it with the engine).
    """
    progress = on_progress or (lambda what, done, total: None)
    out = Path(out)
    # Nothing the build reads may sit inside what --force replaces.
    inputs = [export_dir, quality_text, (quant or QuantOptions()).calibration, draft,
              profile if Path(str(profile)).suffix == ".toml" else None]
    check_output(out, force, "build", inputs=[p for p in inputs if p is not None])
    plan = plan_build(export_dir, profile, runtime, precision, quant, strip_weights)
    graph = ExportedGraph.load(export_dir)
    if draft is not None:
        _check_draft(graph, Path(draft))
    if graph_only:
        _check_graph_only(plan, quality_text)
    else:
        _check_environment(plan)
    with atomic_dir(out, force, "build") as tmp:
        contract, made = _gpu_graph(graph, plan, tmp, progress)
        if graph_only:
            if made is None:  # the export's graph is what the runtime gets: the folder holds a copy
                _copy_export_model(graph, tmp)
            built = {"model_file": contract.model_file, "graph_only": True}
        else:
            built = _run_backend(contract, plan, tmp, progress)
            _drop_unneeded_graph(plan, built, tmp)
        if made is not None:
            built["graph"] = made
        for name in graph.tokenizer_files:
            shutil.copy(graph.path / name, tmp / name)
        if draft is not None:
            shutil.copytree(draft, tmp / DRAFT_FOLDER, ignore=shutil.ignore_patterns(DRAFT_FOLDER))
        _write_sidecar(graph, plan, built, tmp, contract)
        if quality_text is not None and graph_only:
            _record_cpu_quality(graph, plan, tmp, quality_text, progress)
        elif quality_text is not None:
            _record_quality(graph, tmp, quality_text, progress)
    return Engine.load(out)


def _check_draft(graph: ExportedGraph, draft: Path) -> None:
    """A draft must be an export or build of a model with the target's tokenizer (and context)."""
    from edgekit.speculative.draft import check_same_tokenizer

    if not (draft / SIDECAR).is_file():
        raise BuildRefused(f"--draft {draft} is not an export or build folder (no {SIDECAR})",
                           "pass a folder made by edgekit export or edgekit build")
    check_same_tokenizer(graph, ExportedGraph.load(draft))


def _copy_export_model(graph: ExportedGraph, out: Path) -> None:
    from edgekit._files import model_files

    for source in model_files(graph.model_path):
        shutil.copy(source, out / source.name)


def _check_graph_only(plan: BuildPlan, quality_text: Any) -> None:
    if plan.device == "cpu":
        raise BuildRefused("--graph-only writes a GPU build's graph; a CPU build is made here in full",
                           "drop --graph-only, or pick a GPU profile")
    if quality_text is not None and plan.graph is None:
        raise BuildRefused(f"--quality on a --graph-only build measures a GPU precision's graph; {plan.precision} "
                           "is the export's own graph", "measure the export itself: edgekit validate EXPORT --quality TEXT")


def _gpu_graph(graph: ExportedGraph, plan: BuildPlan, out: Path, progress: Progress):
    """(the contract of the graph the runtime gets, the sidecar's ``graph`` or None).

    With a GPU precision the graph is made into ``out``; TensorRT parses that file, ONNX Runtime
    loads it, a weight-stripped plan refits from it. Otherwise the export's own graph.
    """
    if plan.graph is None:
        return graph, None
    from edgekit.engines.gpu_graph import GraphRecipe, graph_contract, make_graph
    from edgekit.errors import require

    recipe = GraphRecipe.from_dict(plan.graph)
    floor = plan.tensorrt["min_version"] if plan.tensorrt else None  # TensorRT's parser reads it
    made = make_graph(graph, recipe, out, plan.runtime, floor, progress)
    proto = require("onnx", ("cpu", "gpu")).load(str(out / recipe.model_file), load_external_data=False)
    return graph_contract(graph, proto, out, recipe.model_file), made


def _drop_unneeded_graph(plan: BuildPlan, built: dict[str, Any], out: Path) -> None:
    """A full TensorRT plan holds its weights: the graph it was parsed from is not shipped twice.
    A weight-stripped plan refits from it, and ONNX Runtime runs it, so those keep it."""
    if plan.graph is None or built["model_file"] == plan.graph["model_file"] or built.get("strip_weights"):
        return
    from edgekit.engines.gpu_graph import GraphRecipe, remove_graph

    remove_graph(out, GraphRecipe.from_dict(plan.graph))
    built["graph_kept"] = False


def _record_cpu_quality(graph: ExportedGraph, plan: BuildPlan, out: Path, text: str | Path, progress: Progress) -> None:
    from edgekit.engines.gpu_graph import GraphRecipe, score_on_cpu

    report = score_on_cpu(graph, out, GraphRecipe.from_dict(plan.graph), text, progress)
    data = json.loads((out / SIDECAR).read_text())
    data["build"]["quality"] = report
    (out / SIDECAR).write_text(json.dumps(data, indent=2) + "\n")


def _record_quality(graph: ExportedGraph, out: Path, text: str | Path, progress: Progress) -> None:
    from edgekit.quality import measure_quality

    report = measure_quality(out, graph.model.source, text, on_progress=progress)
    data = json.loads((out / SIDECAR).read_text())
    data["build"]["quality"] = report.to_dict()
    (out / SIDECAR).write_text(json.dumps(data, indent=2) + "\n")


def environment_problems(plan: BuildPlan) -> list[str]:
    """Why this machine cannot build ``plan``, one sentence each; empty when it can.

    GPU builds happen on the target: they need its GPU and runtime. A CPU build runs anywhere
    (a build for another CPU is made here and refused only where it runs).
    """
    from edgekit.runtimes.registry import get_runtime

    runtime = get_runtime(plan.runtime)
    if runtime.device == "cpu":
        return []
    from edgekit.doctor import detect, missing_requirements

    machine = detect()
    return missing_requirements(plan.requirements, machine) + runtime.environment_problems(machine)


def _check_environment(plan: BuildPlan) -> None:
    """Refuse to start a build this machine cannot make."""
    missing = environment_problems(plan)
    if missing:
        raise BuildRefused(
            f"cannot build {plan.runtime} for {plan.profile} on this machine: {'; '.join(missing)}",
            "run the build on the target device (or use --dry-run here to see the plan)",
        )


def _run_backend(graph: ExportedGraph, plan: BuildPlan, out: Path, progress: Progress) -> dict[str, Any]:
    from edgekit.runtimes.registry import get_runtime

    progress(f"building {plan.runtime} for {plan.profile}", 0, 0)
    runtime = get_runtime(plan.runtime)
    built = runtime.build(graph, plan, out)
    model = out / built["model_file"]
    if getattr(runtime, "edits_graph", False):
        built["graph_edits"] = _edit_graph(model, untie=plan.quantization == "none")
    if plan.quantization != "none":
        # After ORT's own optimization: its constant folding turns the tied lm_head's Transpose
        # into an initializer the quantizer can take, and fusions never see MatMulNBits.
        from edgekit.quantize import QuantSettings, quantize_model

        settings = QuantSettings(plan.quantization, plan.quant_method, plan.quant_block_size,
                                 plan.quant_accuracy_level, bool(plan.quant_lm_head), plan.calibration,
                                 bool(plan.quant_embeddings), plan.quant_lm_head_bits or 4,
                                 bool(plan.quant_symmetric))
        built["quantize"] = quantize_model(graph, model, settings, progress)
    return built


def _edit_graph(model: Path, untie: bool) -> dict[str, Any]:
    """Last-position logits and one tied LM head: see :mod:`edgekit.engines.graph_edits`."""
    from edgekit._files import model_files
    from edgekit.engines.graph_edits import edit_build
    from edgekit.errors import require

    onnx = require("onnx", ("cpu", "gpu"))
    proto = onnx.load(str(model))
    done = edit_build(proto, untie=untie)
    for stale in model_files(model):
        stale.unlink()
    onnx.save_model(proto, str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=model.name + ".data", size_threshold=1024)
    return done


def _write_sidecar(graph: ExportedGraph, plan: BuildPlan, built: dict[str, Any], out: Path,
                   contract: ExportedGraph | None = None) -> None:
    """``export`` is the contract of the graph the runtime runs: the export's, or the GPU graph's
    (its I/O dtypes, ops and opsets) when one was made."""
    export_data = json.loads((graph.path / SIDECAR).read_text())
    if contract is not None and contract is not graph:
        fields = contract.to_dict()
        export_data.update({k: fields[k] for k in ("dtype", "inputs", "outputs", "ops", "custom_ops", "opset")})
    plan_data = plan.to_dict()
    plan_data["requirements"].update(built.pop("requirements", {}))  # what the runtime pinned when it built
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "build",
        "build": {
            **plan_data,
            **built,
            "source_export": {"path": str(graph.path.resolve()), "model_sha256": sha256_file(graph.model_path)},
            "edgekit_version": export_data["versions"].get("edgekit"),
        },
        "export": export_data,
    }
    (out / SIDECAR).write_text(json.dumps(data, indent=2) + "\n")
