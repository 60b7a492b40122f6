"""`edgekit bench --compare speculative:...`: the same tokens as plain edgekit, with acceptance figures."""

from __future__ import annotations

from edgekit.bench import run_bench
from edgekit.bench.report import table_rows
from tests.cli.test_run_errors import assert_refused, edgekit

QUICK = {"prompt_lengths": (8,), "new_tokens": 8, "runs": 2, "warmup": 0}  # 2: each contender is reused


def test_speculative_contenders_report_acceptance_and_match_plain(exported):
    path = exported("Qwen3ForCausalLM")
    report = run_bench(path, compare=["speculative:ngram", f"speculative:draft@3={path}"], **QUICK)
    rows = {row["name"]: row for row in report.to_dict()["contenders"]}
    plain, lookup, draft = rows["edgekit"], rows["speculative:ngram"], rows["speculative:draft@3"]
    assert plain["speculative"] is None
    assert lookup["error"] is None and draft["error"] is None, (lookup["error"], draft["error"])
    assert lookup["tokens_match_first"] and draft["tokens_match_first"]
    assert draft["speculative"]["acceptance_rate"] == 1.0  # the target as its own draft
    assert draft["speculative"]["mean_accepted"] > 1.0 and draft["speculative"]["proposed"] > 0
    assert lookup["decode_tokens_per_s"]["median"] > 0
    names = [row[0] for row in table_rows(report)[1]]
    assert "speculative:draft@3 (accepted 1.00, " in names[2]


def test_a_malformed_speculative_contender_is_refused(exported):
    assert_refused(edgekit("bench", str(exported("Qwen3ForCausalLM")), "--compare", "speculative:eagle"),
                   "error: --compare 'speculative:eagle' is not a speculative contender", "hint: e.g. --compare")
