"""A failure inside ONNX Runtime during a forward pass reaches the user as `error:` / `hint:` (run, validate,
bench) or as an OpenAI-style 500 (serve), never as a traceback.

The broken graph is a real export with one GroupQueryAttention attribute made inconsistent (twice the
query heads): ONNX Runtime loads it, and its kernel rejects it at the first forward pass.
"""

from __future__ import annotations

import logging
import shutil

import httpx
import onnx
import pytest

from tests.cli.test_cli import edgekit

KERNEL_MESSAGE = "Status Message: kv_hidden_size / kv_num_heads must be equal to head_size"


@pytest.fixture(scope="module")
def broken(exported, tmp_path_factory):
    """A copy of the tiny Qwen3 ort export whose first GQA node claims twice its query heads."""
    out = tmp_path_factory.mktemp("broken") / "qwen3-ort"
    shutil.copytree(exported("Qwen3ForCausalLM", "ort"), out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    heads = next(a for a in node.attribute if a.name == "num_heads")
    heads.i *= 2
    onnx.save(model, str(out / "model.onnx"))
    return out


def _command(name, folder, reference):
    return {
        "run": ["run", str(folder), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
        "validate": ["validate", str(folder), "--reference", str(reference), "--steps", "2"],
        "bench": ["bench", str(folder), "--prompt-lengths", "4", "--new-tokens", "2", "--runs", "1", "--warmup", "0"],
    }[name]


@pytest.mark.parametrize("command", ["run", "validate", "bench"])
def test_cli_prints_the_kernel_failure(broken, hf_folder, command):
    result = edgekit(*_command(command, broken, hf_folder("Qwen3ForCausalLM")))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: ONNX Runtime failed running {broken}: Non-zero status code returned "
                                "while running GroupQueryAttention node.")
    assert KERNEL_MESSAGE in errors[0]
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
    assert hints == [f"hint: re-export with another target: edgekit export {hf_folder('Qwen3ForCausalLM')} -o NEW_DIR "
                     f"--target portable; if that runs, report this failure with {broken / 'edgekit.json'}"]
    assert "[E:onnxruntime" not in result.stderr  # ORT's own log line would say it a second time


@pytest.mark.parametrize("stream", [False, True])
def test_serve_answers_500_and_keeps_serving(broken, caplog, stream):
    from tests.serve.conftest import LiveServer

    caplog.set_level(logging.ERROR, logger="edgekit.serve.scheduler")
    with LiveServer(broken, max_batch=2, max_context=64, threads=1) as live:
        body = {"prompt": [1, 2, 3], "max_tokens": 2, "stream": stream}
        for _ in range(2):  # the server survives the first failure
            response = httpx.post(f"{live.url}/completions", json=body, timeout=60)
            if stream:
                assert response.status_code == 200  # the stream had started: the error is its event
                error = next(line for line in response.text.splitlines() if line.startswith("data: {"))
                assert '"type": "server_error"' in error and "ONNX Runtime failed running" in error
                assert response.text.rstrip().endswith("data: [DONE]")
            else:
                assert response.status_code == 500
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
                assert error["message"].startswith(f"ONNX Runtime failed running {broken}: ")
                assert KERNEL_MESSAGE in error["message"]
        assert httpx.get(f"{live.root}/health", timeout=10).status_code == 200
    logged = [r for r in caplog.records if r.name == "edgekit.serve.scheduler"]
    assert logged and all(r.getMessage().startswith("prefill failed: ONNX Runtime failed running") for r in logged)
    assert not [r for r in logged if r.exc_info]  # a user-facing failure, not a bug: no traceback in the log
