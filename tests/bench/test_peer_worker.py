"""The peer worker runs under any Python, without edgekit, and speaks JSON lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from edgekit.bench.contenders import WORKER


def test_worker_imports_nothing_from_edgekit():
    tree = ast.parse(WORKER.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not [m for m in modules if m.split(".")[0] == "edgekit"]


def test_worker_answers_each_line_and_exits_at_eof(tmp_path):
    # edgekit made unimportable: the worker must stand on its own.
    code = f"import sys, runpy; sys.modules['edgekit'] = None; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
    requests = [{"op": "run", "prompt_ids": [1], "new_tokens": 2},
                {"op": "load", "kind": "nope", "model": str(tmp_path)},
                {"op": "memory"}]
    result = subprocess.run([sys.executable, "-c", code], input="".join(json.dumps(r) + "\n" for r in requests),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(replies) == 3
    assert "send a 'load' request first" in replies[0]["error"]
    assert "unknown peer kind 'nope'" in replies[1]["error"]
    assert replies[2] == {"peak_rss_mb": 0.0, "peak_device_mb": None}
