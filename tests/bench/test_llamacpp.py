"""llama.cpp as a bench peer: bad specs fail as the CLI prints them; with a llama.cpp build
(``$EDGEKIT_LLAMACPP_BIN``, default /tmp/llamacpp/build/bin) its GGUF tokenizes as the Hugging Face
tokenizer does, its f32 greedy tokens equal edgekit's, and a bench row comes back whole."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgekit.bench import llamacpp_convert
from edgekit.bench.contenders import ContenderFailed
from edgekit.bench.llamacpp import NEEDED, LlamaCppContender, converter_python, source_tree
from edgekit.export.presets import TOKENIZER_DIR, TRAINED
from tests.cli.test_cli import edgekit

ARCH = "Qwen3ForCausalLM"
BIN = Path(os.environ.get("EDGEKIT_LLAMACPP_BIN", "/tmp/llamacpp/build/bin"))
PRESET = "tiny-code"
CODE = "import os\nimport sys\n\n\ndef main("  # the model continues it with varied tokens, not one repeated


# ---- without llama.cpp ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("llamacpp=/nope", "--compare 'llamacpp=/nope': /nope is not a folder"),
    ("llamacpp", "--compare 'llamacpp': llama.cpp needs the folder of its binaries"),
    ("llamacpp:Q4_K=/nope", "'llamacpp:Q4_K=/nope': llama.cpp variant 'Q4_K' is not one of Q4_0, Q8_0, f16, f32. "
                            "Did you mean 'Q4_0'?"),
    ("llamacp=/nope", "--compare 'llamacp' is not a contender. Did you mean 'llamacpp'?"),
])
def test_bad_specs_say_what_to_do(exported, spec, message):
    result = edgekit("bench", str(exported(ARCH)), "--runs", "1", "--compare", spec)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr.splitlines()[0] and result.stderr.startswith("error: --compare '")
    assert "\nhint: " in result.stderr and "Traceback" not in result.stderr


def test_a_folder_without_the_binaries(exported, tmp_path):
    (tmp_path / "llama-server").write_text("")
    result = edgekit("bench", str(exported(ARCH)), "--runs", "1", "--compare", f"llamacpp:f32={tmp_path}")
    assert result.returncode == 1
    assert f"{tmp_path} has no llama-quantize" in result.stderr
    assert "hint: build them: cmake --build BUILD --target llama-server llama-quantize" in result.stderr


def test_the_source_tree_comes_from_the_build_cache(tmp_path):
    tree, build = tmp_path / "llama.cpp", tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    tree.mkdir()
    assert source_tree(build / "bin") is None  # no CMakeCache.txt
    (build / "CMakeCache.txt").write_text(f"# comment\nllama.cpp_SOURCE_DIR:STATIC={tree}\nOTHER:BOOL=ON\n")
    assert source_tree(build / "bin") is None  # a tree without the converter is not one
    (tree / "convert_hf_to_gguf.py").write_text("")
    assert source_tree(build / "bin") == tree


def test_a_summary_lost_at_exit_is_measured_again(tmp_path):
    """llama-perplexity's leaked logger can drop the summary when main returns; the run is repeated,
    and a tool that never prints it fails naming the figure."""
    from edgekit.bench.llamacpp import MEAN_KLD, TRIES, _perplexity

    count = tmp_path / "runs"
    tool = tmp_path / "llama-perplexity"
    tool.write_text(f'#!/bin/sh\necho x >> {count}\necho "chunk 1"\n'
                    f'[ $(wc -l < {count}) -ge 2 ] && echo "Mean    KLD:   0.000620 +- 0.00001"\nexit 0\n')
    tool.chmod(0o755)
    assert "Mean    KLD:   0.000620" in _perplexity([str(tool)], [MEAN_KLD])
    assert count.read_text().count("x") == 2
    tool.write_text('#!/bin/sh\necho "chunk 1"\n')
    with pytest.raises(ContenderFailed, match=f"exited cleanly {TRIES} times without printing 'Mean KLD'; its last line: chunk 1"):
        _perplexity([str(tool)], [MEAN_KLD])


def test_the_presets_pre_tokenizer_is_gpt2s_split():
    tokenizer = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert llamacpp_convert.pre_tokenizer_name(tokenizer) == "gpt-2"
    qwen2 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llamacpp_convert.QWEN2_REGEX}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    assert llamacpp_convert.pre_tokenizer_name(qwen2) == "qwen2"
    with pytest.raises(NotImplementedError, match="no llama.cpp pre-tokenizer matches"):
        llamacpp_convert.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


class WireFormat(http.server.BaseHTTPRequestHandler):
    """llama-server's /completion stream as its source writes it (send_partial_response): a begin
    chunk, then one chunk per token with the decoded count, except that a token ending in a partial
    UTF-8 character is held back and only counted by the next chunk; then a final chunk."""

    chunks: list[dict] = []
    plain: dict = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()
        if not body["stream"]:
            self.wfile.write(json.dumps(self.plain).encode())
            return
        for chunk in self.chunks:
            time.sleep(0.03)
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

    def log_message(self, *_):
        pass


@pytest.fixture
def wire():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WireFormat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    contender = LlamaCppContender("llamacpp", BIN, "unused", ctx=64)
    contender.port = server.server_address[1]
    yield contender
    server.shutdown()
    server.server_close()


def test_a_held_back_token_arrives_with_the_next(wire):
    WireFormat.chunks = [{"tokens": [], "tokens_predicted": 0}, {"tokens": [11], "tokens_predicted": 1},
                         {"tokens": [13], "tokens_predicted": 3}, {"tokens": [14], "tokens_predicted": 4},
                         {"stop": True, "tokens": [], "tokens_predicted": 4, "timings": {"prompt_n": 3, "cache_n": 0}}]
    WireFormat.plain = {"tokens": [11, 12, 13, 14]}
    timing = wire.run([1, 2, 3], 4)
    assert timing.token_ids == (11, 12, 13, 14)  # the held-back id from an untimed plain request
    assert timing.step_ms[1] == 0 and min(timing.step_ms[0], timing.step_ms[2]) >= 25 and len(timing.step_ms) == 3
    assert timing.ttft_ms >= 50 and timing.e2e_ms >= timing.ttft_ms + sum(timing.step_ms)


def test_a_cached_prompt_is_refused(wire):
    WireFormat.chunks = [{"tokens": [11], "tokens_predicted": 1}, {"tokens": [12], "tokens_predicted": 2},
                         {"stop": True, "tokens_predicted": 2, "timings": {"prompt_n": 1, "cache_n": 2}}]
    with pytest.raises(ContenderFailed, match="prefilled 1 of 3 prompt tokens"):
        wire.run([1, 2, 3], 2)
    WireFormat.chunks[-1]["timings"] = {"prompt_n": 3, "cache_n": 0}
    with pytest.raises(ContenderFailed, match="generated 2 of 5 tokens"):
        wire.run([1, 2, 3], 5)


# ---- with a llama.cpp build ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bin_dir():
    missing = [name for name in NEEDED if not (BIN / name).is_file()]
    if missing:
        pytest.skip(f"no llama.cpp build: {BIN} lacks {', '.join(missing)} (set EDGEKIT_LLAMACPP_BIN; docs/bench.md)")
    python = converter_python(BIN)
    probe = subprocess.run([python, "-c", "import torch, transformers, sentencepiece"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the converter's python {python} lacks torch/transformers/sentencepiece (EDGEKIT_LLAMACPP_PYTHON)")
    return BIN.resolve()


@pytest.fixture(scope="module")
def tiny_code_export(tmp_path_factory):
    from edgekit.export import export_model

    out = tmp_path_factory.mktemp("tiny-code-llamacpp") / "export"
    export_model(PRESET, out, target="ort", dtype="fp32")
    return out


def token_ids(text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TRAINED[PRESET] / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_the_gguf_tokenizes_as_the_hugging_face_tokenizer(bin_dir, tmp_path):
    from tokenizers import Tokenizer

    from edgekit.bench.llamacpp import prepare_gguf

    if not (bin_dir / "llama-tokenize").is_file():
        pytest.skip(f"{bin_dir} has no llama-tokenize")
    gguf = prepare_gguf(bin_dir, TRAINED[PRESET], "f32", threads=1)
    text = (TRAINED[PRESET] / "heldout.txt").read_text()[:3000] + " naïve — 数据 🚀\n\ttabs  and   spaces"
    (tmp_path / "sample.txt").write_text(text)
    result = subprocess.run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", str(tmp_path / "sample.txt"),
                             "--ids", "--no-escape", "--log-disable"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    hf = Tokenizer.from_file(str(TRAINED[PRESET] / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert len(hf) > 500 and ours == hf


def test_f32_greedy_tokens_equal_edgekits(bin_dir, tiny_code_export):
    from edgekit.bench import EdgekitContender
    from edgekit.bench.contenders import make_contender
    from edgekit.types import ExportedGraph

    prompt, count = token_ids(CODE), 12
    long_prompt = token_ids((TRAINED[PRESET] / "heldout.txt").read_text())[:600]  # over one ubatch (512)
    ours = EdgekitContender(tiny_code_export, threads=1)
    peer = make_contender(f"llamacpp:f32={bin_dir}", ExportedGraph.load(tiny_code_export), threads=1)
    try:
        ours.load()
        expected, expected_long = ours.run(prompt, count).token_ids, ours.run(long_prompt, 4).token_ids
        loaded = peer.load()
        first, long, again = peer.run(prompt, count), peer.run(long_prompt, 4), peer.run(prompt, count)
        memory = peer.memory()
    finally:
        ours.close()
        peer.close()
        peer.close()  # twice is fine
    # llama.cpp masks EOS to keep generating; edgekit does not: only a stretch without EOS compares
    assert 0 not in expected + expected_long and len(set(expected)) > 3
    assert first.token_ids == expected and again.token_ids == expected and long.token_ids == expected_long
    assert first.prompt_tokens == len(prompt) and len(first.step_ms) == count - 1 and first.ttft_ms > 0
    assert first.e2e_ms >= first.ttft_ms + sum(first.step_ms) * 0.99
    assert loaded.engine_bytes == peer.gguf.stat().st_size and "f32" in loaded.detail and "-t 1" in loaded.detail
    assert memory["peak_rss_mb"] > loaded.engine_bytes / 2**20 and memory["peak_device_mb"] is None
    assert peer.memory()["peak_rss_mb"] is None  # closed: no process to read


def test_a_q4_bench_row(bin_dir, tiny_code_export):
    from edgekit.bench import run_bench

    report = run_bench(tiny_code_export, prompt_lengths=(16,), new_tokens=6, runs=1, warmup=0, threads=1,
                       compare=[f"llamacpp:Q4_0={bin_dir}"])
    row = {r["name"]: r for r in report.to_dict()["contenders"]}["llamacpp:Q4_0"]
    assert row["error"] is None, row["error"]
    assert row["decode_tokens_per_s"]["median"] > 0 and row["tokens_generated"] == 6
    assert "Q4_0" in row["detail"] and 0 < row["engine_bytes"] < 2_104_816  # below the fp16 safetensors


def test_quality_against_f32(bin_dir):
    from edgekit.bench.llamacpp import llamacpp_quality

    if not (bin_dir / "llama-perplexity").is_file():
        pytest.skip(f"{bin_dir} has no llama-perplexity (cmake --build BUILD --target llama-perplexity)")
    result = llamacpp_quality(bin_dir, TRAINED[PRESET], "Q8_0", TRAINED[PRESET] / "heldout.txt", ctx=256, threads=1)
    assert 1 < result["ppl_f32"] < 500  # trained (edgekit's reference: 288); untrained weights score about 2048
    assert result["ppl"] == pytest.approx(result["ppl_f32"], rel=0.05)  # 8-bit weights barely move it
    assert 0 <= result["mean_kld"] < 0.05 and 0.9 < result["same_top_p"] <= 1
