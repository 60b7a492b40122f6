"""The MTP head of the trained ``tiny-code-mtp`` preset, run inside the target's graph: export, parity with
PyTorch, proposals that the target accepts, greedy identity, builds (CPU and the TensorRT session's
stepping code), serve, the CLI, and the head travelling inside a bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.export.presets import TRAINED
from edgekit.generate import Sampling, generate
from edgekit.runtimes.registry import open_engine
from edgekit.speculative import generate_speculative
from edgekit.speculative.mtp import open_mtp
from tests.cli.test_run_errors import assert_refused, edgekit

PRESET = "tiny-code-mtp"


@pytest.fixture(scope="module")
def mtp_export(tmp_path_factory):
    """`edgekit export tiny-code-mtp --mtp`, as a user runs it."""
    out = tmp_path_factory.mktemp("mtp") / "export"
    result = edgekit("export", PRESET, "-o", str(out), "--mtp")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def code_prompts(mtp_export):
    """Three 48-token windows of the held-out Python source (never trained on)."""
    from edgekit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(open_engine(mtp_export).graph)
    ids = tokenizer.encode((TRAINED[PRESET] / "heldout.txt").read_text())
    return [ids[start:start + 48] for start in (0, 700, 1400)]


def _reference(ids, next_tokens=None):
    """PyTorch: the target's logits and the head's logits at every row of ``ids`` (1, S), each row t paired
    with ``next_tokens[t]`` (default: the target's greedy token at t, as the fused graph pairs it)."""
    import torch
    import transformers

    from edgekit.export import resolve
    from edgekit.export.mtp import load_head

    folder = TRAINED[PRESET]
    model = transformers.Qwen3_5ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    head = load_head(folder, resolve.load_config(folder))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state  # (1, S, H)
        logits = model.lm_head(hidden)
        tokens = logits.argmax(-1) if next_tokens is None else next_tokens
        embeds = model.model.embed_tokens(tokens)
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        mtp = model.lm_head(head(embeds, hidden, model.model.rotary_emb(embeds, positions)))
    return logits[0].numpy(), mtp[0].numpy()


def test_the_head_inside_the_graph_computes_its_pytorch_forward(mtp_export):
    """Two forwards (the head's KV cache carries over): its rows are the head's PyTorch forward, each
    row paired with the target's own greedy token; the export is one graph with the head's layer last."""
    import torch

    from edgekit.types import MTP_LOGITS, ExportedGraph

    graph = ExportedGraph.load(mtp_export)
    assert graph.layers[-1].index == graph.model.num_layers and graph.layers[-1].kind == "attention"
    assert graph.outputs[-1].name == MTP_LOGITS and not (mtp_export / "mtp").exists()
    ids = torch.tensor([list(range(40, 60))])
    logits, expected = _reference(ids)
    target = open_engine(mtp_export)
    first = target.forward(ids[0, :12].tolist())
    head_first = target.mtp_logits
    rest = target.forward(ids[0, 12:].tolist())
    np.testing.assert_allclose(np.concatenate([first, rest]), logits, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([head_first, target.mtp_logits]), expected, atol=1e-4)


def test_greedy_mtp_matches_plain_and_the_target_accepts_most_proposals(mtp_export, code_prompts):
    session = open_engine(mtp_export)
    proposed = accepted = rounds = 0
    for prompt in code_prompts:
        plain = generate(session, prompt, 32).token_ids
        result = generate_speculative(session, prompt, 32, open_mtp(session), 1)
        assert result.token_ids == plain
        proposed, accepted, rounds = proposed + result.proposed, accepted + result.accepted, rounds + result.rounds
    rate = accepted / proposed
    print(f"MTP acceptance at k=1 on held-out code: {accepted}/{proposed} = {rate:.3f}")
    assert rate >= 0.6  # the goal (benchmarks/SPECULATIVE.md)
    assert rounds < 3 * 31  # one forward a round verifies and proposes: fewer forwards than tokens


def test_a_build_speculates_as_its_export_and_pairs_prompt_rows_with_their_next_token(mtp_export, code_prompts,
                                                                                    tmp_path):
    """A CPU build computes the last row's logits in a prefill (logits_to_keep), so the head pairs the
    prompt's rows with the prompt's own next tokens (what it was trained on); int4 and fp32 builds
    speculate with plain decoding's tokens, and the head's proposals are kept."""
    import torch

    from edgekit.engines import build_engine
    from edgekit.engines.plan import QuantOptions

    fp32 = build_engine(mtp_export, "cpu-x86-64", tmp_path / "fp32", quant=QuantOptions("none"))
    assert fp32.details["graph_edits"] == {"tied_lm_head": True, "logits_to_keep": True, "mtp_rows_kept": True}
    session = open_engine(fp32.path)
    ids = code_prompts[0]
    last = session.last_logits(ids)
    given = torch.tensor([ids[1:] + [int(np.argmax(last))]])
    _, expected = _reference(torch.tensor([ids]), given)
    assert session.mtp_logits.shape == (1, expected.shape[1])
    np.testing.assert_allclose(session.mtp_logits[0], expected[-1], atol=1e-3)
    built = build_engine(mtp_export, "cpu-x86-64", tmp_path / "int4")
    # the head's LM head and embedding lookup read the model's int4 tables: no float table is left
    assert built.details["quantize"]["mtp_nodes_shared"] == 2
    import onnx

    proto = onnx.load(str(built.path / "model.onnx"), load_external_data=False)
    assert not [t.name for t in proto.graph.initializer if list(t.dims) in ([2048, 128], [128, 2048])
                and t.data_type == onnx.TensorProto.FLOAT]
    int4 = open_engine(built.path)
    proposed = accepted = 0
    for prompt in code_prompts:
        result = generate_speculative(int4, prompt, 24, open_mtp(int4), 1)
        assert result.token_ids == generate(int4, prompt, 24).token_ids
        proposed, accepted = proposed + result.proposed, accepted + result.accepted
    assert accepted / proposed >= 0.5


def test_an_int4_export_quantizes_each_shared_table_once(tmp_path, code_prompts):
    """The head reads the model's embedding and LM head: `export --quant int4 --mtp` writes one quantized
    copy of each table, read by both lookups and both heads, and the head's proposals are kept."""
    import onnx

    out = tmp_path / "int4"
    done = edgekit("export", PRESET, "-o", str(out), "--mtp", "--quant", "int4")
    assert done.returncode == 0, done.stderr
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    tables = [i.name for i in proto.graph.initializer if i.name.startswith("lm_head.weight") and i.name.endswith(".q4")]
    assert sorted(tables) == ["lm_head.weight.q4", "lm_head.weight.transpose.q4"], tables  # the lookup's, the head's
    readers = {table: sorted(n.op_type for n in proto.graph.node if table in n.input) for table in tables}
    assert readers == {"lm_head.weight.q4": ["GatherBlockQuantized"] * 2,
                       "lm_head.weight.transpose.q4": ["MatMulNBits"] * 2}
    session = open_engine(out)
    proposed = accepted = 0
    for prompt in code_prompts:
        result = generate_speculative(session, prompt, 24, open_mtp(session), 1)
        proposed, accepted = proposed + result.proposed, accepted + result.accepted
    assert accepted / proposed >= 0.5


def test_a_narrower_head_vocabulary_proposes_among_the_first_ids(tmp_path, code_prompts):
    """`--mtp-vocab 1024`: the head's LM head holds the first 1024 rows, its logits are 1024 wide, and
    greedy and sampled speculation keep working (the rejection rule gets full-vocabulary rows)."""
    import onnx

    out = tmp_path / "narrow"
    done = edgekit("export", PRESET, "-o", str(out), "--mtp", "--mtp-vocab", "1024")
    assert done.returncode == 0, done.stderr
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    narrow = next(i for i in proto.graph.initializer if i.name == "mtp.lm_head.weight.transpose")
    assert list(narrow.dims) == [128, 1024]
    session = open_engine(out)
    proposed = accepted = 0
    for prompt in code_prompts:
        result = generate_speculative(session, prompt, 32, open_mtp(session), 1)
        assert result.token_ids == generate(session, prompt, 32).token_ids
        assert session.mtp_logits.shape[-1] == 1024
        proposed, accepted = proposed + result.proposed, accepted + result.accepted
    assert accepted / proposed >= 0.6
    sampling = Sampling(temperature=0.7, seed=5)
    proposer = open_mtp(session, sampling)
    sampled = generate_speculative(session, code_prompts[0], 32, proposer, 1, sampling)
    assert len(sampled.token_ids) == 32 and sampled.accepted > 0


def test_serve_speculates_with_the_head_in_the_batched_engine(mtp_export, code_prompts):
    """`serve --speculative mtp` batches: three requests decode together, the last one left speculates
    from the head rows its engine row kept (through plain steps and row moves), and a repeated prompt
    (a whole prefix-cache hit: no forward, no head rows) speculates after one plain verify. Every reply
    is plain decoding's, and the head's proposals are kept."""
    from edgekit.serve.app import Server, ServeConfig
    from edgekit.serve.engine import BatchedEngine
    from edgekit.serve.scheduler import Job

    server = Server(mtp_export, ServeConfig(max_batch=4, max_context=256, threads=1, speculative="mtp"))
    assert isinstance(server.engine, BatchedEngine) and server.serial_reason is None
    assert server.speculator.draft_tokens == 1 and server.engine.prefix_cache is not None

    def serve(prompts, lengths):
        jobs = [Job(p, n, Sampling(temperature=0), (), [], None, lambda e: None) for p, n in zip(prompts, lengths)]
        for job in jobs:
            server.scheduler.submit(job)
        while server.scheduler.waiting or server.scheduler.active:
            server.scheduler.step()
        return [j.token_ids for j in jobs]

    session = open_engine(mtp_export)
    lengths = [6, 12, 32]
    assert serve(code_prompts, lengths) == [generate(session, p, n).token_ids for p, n in zip(code_prompts, lengths)]
    assert serve(code_prompts[2:], [32]) == [generate(session, code_prompts[2], 32).token_ids]
    text = server.metrics.render()
    proposed, accepted = (float(next(line.split()[-1] for line in text.splitlines()
                                     if line.startswith(f"edgekit_speculative_{what}_tokens_total "))) for what in
                          ("proposed", "accepted"))
    assert proposed >= 20 and accepted / proposed >= 0.5
    server.speculator.close()


def test_the_batched_engine_serves_an_export_with_the_head_plainly(mtp_export, code_prompts):
    """Without --speculative the head's layer is one more KV cache to the batched engine: two requests
    in one batch get plain decoding's tokens."""
    from edgekit.serve.app import Server, ServeConfig
    from edgekit.serve.engine import BatchedEngine
    from edgekit.serve.scheduler import Job

    server = Server(mtp_export, ServeConfig(max_batch=4, max_context=256, threads=1))
    assert isinstance(server.engine, BatchedEngine)
    jobs = [Job(p, 12, Sampling(temperature=0), (), [], None, lambda e: None) for p in code_prompts[:2]]
    for job in jobs:
        server.scheduler.submit(job)
    while server.scheduler.waiting or server.scheduler.active:
        server.scheduler.step()
    session = open_engine(mtp_export)
    assert [j.token_ids for j in jobs] == [generate(session, p, 12).token_ids for p in code_prompts[:2]]


def test_the_tensorrt_session_speculates_with_the_head(tmp_path, code_prompts):
    """The graph a TensorRT plan is built from keeps the head; the plan session's stepping code (run on
    ONNX Runtime CPU, tests/runtimes/test_tensorrt_session.py) binds and returns its rows (here 1024
    wide: --mtp-vocab), and greedy MTP gives plain decoding's tokens."""
    import dataclasses

    from edgekit.engines import build_engine
    from edgekit.profiles import ShapeRange, load_profile
    from edgekit.runtimes import tensorrt
    from edgekit.runtimes.tensorrt_session import PlanSession, buffer_plan
    from edgekit.types import MTP_LOGITS, ExportedGraph
    from tests.runtimes.test_tensorrt_session import OrtExecutor

    export = tmp_path / "decomposed"
    done = edgekit("export", PRESET, "-o", str(export), "--mtp", "--mtp-vocab", "1024", "--target", "decomposed")
    assert done.returncode == 0, done.stderr
    build = build_engine(export, "jetson-orin-nano-8gb", tmp_path / "build", runtime="tensorrt", graph_only=True)
    import onnx

    assert MTP_LOGITS in {o.name for o in onnx.load(str(build.path / "model.onnx"), load_external_data=False).graph.output}
    graph = ExportedGraph.load(export)
    profile = load_profile("jetson-orin-nano-8gb")
    profile = dataclasses.replace(profile, shapes={"batch": ShapeRange(1, 1, 1), "prompt": ShapeRange(1, 16, 64),
                                                   "context": ShapeRange(1, 128, 128)})
    session = PlanSession(graph, buffer_plan(graph, tensorrt.shape_profile(graph, profile)),
                          OrtExecutor(graph.model_path), "ONNX Runtime CPU as TensorRT")
    prompt = code_prompts[1]
    result = generate_speculative(session, prompt, 24, open_mtp(session), 1)
    assert result.token_ids == generate(open_engine(export), prompt, 24).token_ids and result.accepted > 0
    assert session.mtp_logits.shape[1] == 1024


def test_sampled_mtp_keeps_proposals_and_repeats_under_a_seed(mtp_export, code_prompts):
    session = open_engine(mtp_export)

    def sample(seed):
        sampling = Sampling(temperature=0.7, seed=seed)
        result = generate_speculative(session, code_prompts[0], 32, open_mtp(session, sampling), 1, sampling)
        return result.token_ids, result.proposed, result.accepted

    first, again, other = sample(3), sample(3), sample(4)
    assert len(first[0]) == 32 and first[2] > 0
    assert again == first  # the head's own draws follow the seed too (--seed reproduces a run)
    assert other[0] != first[0]


def test_a_reused_mtp_proposer_starts_each_generation_afresh(mtp_export, code_prompts):
    """bench reuses one proposer for every run: the second run of a prompt is the first's, figures too."""
    session = open_engine(mtp_export)
    proposer = open_mtp(session)
    runs = [generate_speculative(session, prompt, 24, proposer, 1) for prompt in (code_prompts[0], code_prompts[1],
                                                                                   code_prompts[0])]
    fresh = generate_speculative(session, code_prompts[1], 24, open_mtp(session), 1)
    assert (runs[1].token_ids, runs[1].accepted, runs[1].proposed) == (fresh.token_ids, fresh.accepted, fresh.proposed)
    assert (runs[2].token_ids, runs[2].accepted, runs[2].proposed) == (runs[0].token_ids, runs[0].accepted,
                                                                       runs[0].proposed)


def test_run_speculative_mtp_prints_plain_decodings_tokens(mtp_export):
    def run(*extra):
        done = edgekit("run", str(mtp_export), "--prompt", "def main(argv):\n    ", "--max-new-tokens", "16",
                       "--json", *extra)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    plain, mtp = run(), run("--speculative", "mtp")
    assert mtp["token_ids"] == plain["token_ids"] and mtp["speculative"]["accepted"] > 0


def test_the_head_travels_inside_a_bundle(mtp_export, tmp_path):
    bundle = tmp_path / "code.edgepkg"
    assert edgekit("package", str(mtp_export), "-o", str(bundle)).returncode == 0
    done = edgekit("run", str(bundle), "--prompt-ids", "40,41,42,43", "--max-new-tokens", "8", "--json",
                   "--speculative", "mtp")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["speculative"]["proposed"] > 0


def _checkpoint_without(tmp_path, drop):
    """The tiny-code-mtp checkpoint re-saved without the tensors ``drop`` selects (as a re-save loses mtp.*)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "checkpoint"
    shutil.copytree(TRAINED[PRESET], folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not drop(k)}, folder / "model.safetensors", {"format": "pt"})
    return folder


@pytest.mark.parametrize("drop,said", [
    (lambda key: key.startswith("mtp."), "but its safetensors hold no mtp.* tensors"),
    (lambda key: key.startswith("mtp.layers.0.mlp."), "safetensors have no mtp.layers.0.mlp.down_proj.weight (and 2 more)"),
    (lambda key: "embed_tokens" in key, "safetensors hold no embedding"),
], ids=["no-mtp-tensors", "some-mtp-tensors", "no-embedding"])
def test_export_mtp_refuses_a_checkpoint_without_its_tensors_before_exporting(tmp_path, drop, said):
    folder = _checkpoint_without(tmp_path, drop)
    out = tmp_path / "out"
    assert_refused(edgekit("export", str(folder), "-o", str(out), "--mtp"), said, "hint: use the original checkpoint")
    assert not out.exists()  # refused before the target's export, not after it


def test_mtp_refusals_as_printed(exported, tmp_path):
    assert_refused(edgekit("export", "tiny-qwen3", "-o", str(tmp_path / "x"), "--mtp"),
                   "error: tiny-qwen3 has no Qwen3.5 MTP head", "hint: --mtp applies to Qwen3.5/3.6")
    assert_refused(edgekit("export", PRESET, "-o", str(tmp_path / "x"), "--mtp-vocab", "512"),
                   "error: --mtp-vocab applies with --mtp", "hint: add --mtp, or drop --mtp-vocab")
    assert_refused(edgekit("export", PRESET, "-o", str(tmp_path / "x"), "--mtp", "--mtp-vocab", "1"),
                   "error: --mtp-vocab 1 is outside 2..2048 (tiny-code-mtp's vocabulary)",
                   "hint: e.g. --mtp-vocab 32768")
    assert not (tmp_path / "x").exists()
    plain = exported("Qwen3_5ForCausalLM")
    assert_refused(edgekit("run", str(plain), "--prompt-ids", "1,2", "--speculative", "mtp"),
                   f"error: {plain} has no MTP head", "hint: export the Qwen3.5/3.6 checkpoint with its head")
    assert_refused(edgekit("run", str(plain), "--prompt-ids", "1,2", "--speculative", "mtp", "--draft-tokens", "2"),
                   "error: --draft-tokens 2 with --speculative mtp: the MTP head proposes one token a round",
                   "hint: drop --draft-tokens")
