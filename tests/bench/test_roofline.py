"""The roofline's two terms: the weight bytes a decode step reads (from the ONNX graph) and this
machine's measured, cached bandwidth; and the bench report that puts them together."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.bench import metrics, run_bench
from edgekit.bench.metrics import decode_bytes, machine_bandwidth

V, H, F = 100, 16, 32  # vocabulary, hidden, a product's output width


def _save(tmp_path, nodes, initializers, inputs, outputs):
    """A model file whose weights live in external data (as exports keep them)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _weights(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


IDS = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])
OUT = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)


def test_a_gather_only_table_is_read_one_row_and_a_product_whole(tmp_path):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["out"])]
    unused = _weights("unused", 1000)  # an initializer no node reads is not read
    path = _save(tmp_path, nodes, [_weights("table", V, H), _weights("w", H, F), unused], [IDS], [OUT])
    (tmp_path / "model.onnx.data").write_bytes(b"")  # sizes come from dims and dtype: the weights are never read
    assert decode_bytes(path) == H * 4 + H * F * 4


def test_a_tied_table_is_read_whole_once(tmp_path):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
             helper.make_node("Gemm", ["x2", "table"], ["out"], transB=1),  # the LM head reads the same table
             helper.make_node("Reshape", ["x", "shape"], ["x2"])]
    shape = numpy_helper.from_array(np.array([1, H], dtype=np.int64), "shape")
    path = _save(tmp_path, nodes, [_weights("table", V, H), shape], [IDS], [OUT])
    assert decode_bytes(path) == V * H * 4 + 2 * 8


def test_quantized_tables_count_rows_and_packed_bytes(tmp_path):
    # int4 blocks of 16: data (V, 1, 8) uint8 packs H=16 values a row; scales (V, 1) fp32.
    gather = helper.make_node("GatherBlockQuantized", ["qtable", "ids", "scales"], ["x"], domain="com.microsoft",
                              block_size=16, bits=4)
    product = helper.make_node("MatMul", ["x", "w4"], ["out"])
    w4 = helper.make_tensor("w4", TensorProto.INT4, [H, F], vals=np.zeros(H * F, dtype=np.int8).tolist())
    initializers = [_weights("qtable", V, 1, 8, dtype=np.uint8), _weights("scales", V, 1), w4]
    path = _save(tmp_path, [gather, product], initializers, [IDS], [OUT])
    assert decode_bytes(path) == 8 + 4 + H * F // 2


def test_a_gather_along_another_axis_reads_the_whole_tensor(tmp_path):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["out"], axis=1)]
    assert decode_bytes(_save(tmp_path, nodes, [_weights("table", V, H)], [IDS], [OUT])) == V * H * 4


def test_not_an_onnx_file_has_no_figure(tmp_path):
    (tmp_path / "plan.engine").write_bytes(b"\x00\x01 not protobuf \xff" * 10)
    assert decode_bytes(tmp_path / "plan.engine") is None and decode_bytes(tmp_path / "missing.onnx") is None


@pytest.fixture
def small_probe(monkeypatch, tmp_path):
    """The real probe on 16 MiB buffers, its calls logged (these tests check the cache, not the figure)."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "load_average", lambda: 0.3)  # a quiet machine throughout
    calls = []
    real = metrics.measure_bandwidth
    monkeypatch.setattr(metrics, "measure_bandwidth",
                        lambda threads: calls.append(threads) or real(threads, mb_per_thread=16, repeats=2))
    return calls


def test_the_probe_is_cached_per_thread_count_and_refreshed_on_demand(small_probe, tmp_path):
    first = machine_bandwidth(threads=2)
    assert first["cached"] is False and first["read_gbs"] > 0 and first["copy_gbs"] > 0 and first["threads"] == 2
    again = machine_bandwidth(threads=2)
    assert again["cached"] is True and again["read_gbs"] == first["read_gbs"] and small_probe == [2]
    files = list((tmp_path / "cache" / "bandwidth").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["read_gbs"] == first["read_gbs"]
    assert machine_bandwidth(threads=1)["cached"] is False and small_probe == [2, 1]  # another key
    fresh = machine_bandwidth(threads=2, refresh=True)
    assert fresh["cached"] is False and small_probe == [2, 1, 2]
    assert json.loads(files[0].read_text())["measured_at"] == fresh["measured_at"]
    files[0].write_text("{not json")  # a damaged cache is measured again, not trusted
    assert machine_bandwidth(threads=2)["cached"] is False and small_probe == [2, 1, 2, 2]


def test_a_probe_taken_on_a_busy_machine_is_taken_again_once_it_is_quiet(small_probe, monkeypatch):
    cores = metrics._cores()
    load = {"now": 1.0 * cores}
    monkeypatch.setattr(metrics, "load_average", lambda: load["now"])
    busy = machine_bandwidth(threads=1)
    assert busy["load_average"] == cores and machine_bandwidth(threads=1)["cached"] is True  # still as busy
    load["now"] = 0.1
    quiet = machine_bandwidth(threads=1)
    assert quiet["cached"] is False and quiet["load_average"] == 0.1 and small_probe == [1, 1]
    load["now"] = 1.0 * cores
    assert machine_bandwidth(threads=1)["cached"] is True  # a quiet figure is kept when the machine gets busy


def test_the_read_kernel_releases_the_gil():
    """The probe's threads read in parallel only if ``chunk @ vector`` lets go of the GIL: with the
    switch interval long, this thread runs during the call only if the call released it. On a busy
    machine the OS may not schedule this thread within one call, so a few calls are tried; a call
    that holds the GIL lets it run in none of them."""
    chunk = np.ones((32768, metrics.VECTOR), dtype=np.float32)  # 128 MiB: a call of milliseconds
    vector, out = np.ones(metrics.VECTOR, dtype=np.float32), np.empty(32768, dtype=np.float32)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.2)  # no forced hand-over between started.set() and the call
    try:
        spins = [_spins_during(chunk, vector, out) for _ in range(5)]
    finally:
        sys.setswitchinterval(interval)
    assert max(spins) > 0 and out[0] == metrics.VECTOR, spins


def _spins_during(chunk, vector, out) -> int:
    """How often this thread looped while another ran ``chunk @ vector``."""
    started, state = threading.Event(), {"done": False}

    def read():
        started.set()
        np.matmul(chunk, vector, out=out)
        state["done"] = True

    worker = threading.Thread(target=read)
    worker.start()
    started.wait()
    spins = 0
    while not state["done"]:
        spins += 1
    worker.join()
    return spins


def test_the_bench_rooflines_against_the_measured_read_figure(exported, small_probe):
    report = run_bench(exported("Qwen3ForCausalLM"), prompt_lengths=(8,), new_tokens=4, runs=1, warmup=0).to_dict()
    settings, row = report["settings"], report["contenders"][0]
    assert settings["bandwidth_source"].startswith("measured") and small_probe  # by default, no option needed
    assert settings["bandwidth_gbs"] > 0 and settings["copy_gbs"] > 0
    from edgekit.profiles import load_profile

    datasheet = load_profile(settings["profile"]).hardware.get("memory_bandwidth_gbs") if settings["profile"] else None
    assert settings["datasheet_gbs"] == datasheet
    from edgekit.types import ExportedGraph

    graph = ExportedGraph.load(exported("Qwen3ForCausalLM"))
    assert row["decode_bytes"] == decode_bytes(graph.model_path) and 0 < row["decode_bytes"] <= row["engine_bytes"]
    bound_s = row["decode_bytes"] / (settings["bandwidth_gbs"] * 1e9)
    assert row["roofline_fraction"] == pytest.approx(bound_s * row["decode_tokens_per_s"]["median"])
