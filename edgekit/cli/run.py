"""``edgekit run PATH --prompt TEXT``: streaming generation on the engine's runtime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from edgekit.cli._output import console, json_errors, print_json
from edgekit.errors import EdgekitError


def run(
    path: Path = typer.Argument(..., help="An export or build folder, or a bundle (FILE.edgepkg)."),
    prompt: str = typer.Option(None, "--prompt", help="Prompt text (needs the export's tokenizer)."),
    prompt_ids: str = typer.Option(None, "--prompt-ids", help="Prompt token ids, comma separated: 1,2,3."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature (greedy if no sampling option)."),
    top_k: int = typer.Option(None, "--top-k", help="Sample among the K most likely tokens."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
    threads: int = typer.Option(None, "--threads", help="CPU threads of the runtime (ONNX Runtime's intra-op threads; default: all cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print token ids, text and timings as JSON."),
    profile: str = typer.Option(None, "--profile", help="With a bundle: this profile's engine, not the best fit."),
    chat: bool = typer.Option(False, "--chat", help="Converse turn by turn on stdin; the cache persists between turns."),
    mmap: bool = typer.Option(None, "--mmap/--no-mmap", help=(
        "Keep the weights memory-mapped (no private copy; slower int4). Default: only when they exceed "
        "80% of available memory.")),
    speculative: str = typer.Option(None, "--speculative", help=(
        "Speculative decoding: ngram (prompt lookup), draft:PATH (a smaller export, same tokenizer), draft (the "
        "one a build carries: build --draft) or mtp (the model's own MTP head: export --mtp). Same output when "
        "greedy, same distribution when sampling.")),
    draft_tokens: int = typer.Option(None, "--draft-tokens", help="Tokens proposed per step with --speculative (default 4; mtp: 1)."),
) -> None:
    """Generate from PROMPT with the exported model (greedy unless a sampling option is given)."""
    from edgekit.generate import Sampling

    done: dict[str, Any] = {}  # with --chat: the turns so far, printed with the error if a later one fails
    with json_errors(json_out, done):
        sampling = Sampling(temperature, top_k, top_p, seed).check()
        if max_new_tokens < 1:
            raise EdgekitError(f"--max-new-tokens {max_new_tokens} must be >= 1", "e.g. --max-new-tokens 64")
        _check_speculative(speculative, draft_tokens, chat)
        session = _open(path, profile, threads, mmap)
        if chat:
            _chat(session, prompt, max_new_tokens, sampling, json_out, done)
        else:
            proposer = None
            if speculative is not None:
                from edgekit.speculative import default_draft_tokens, open_proposer

                proposer = open_proposer(speculative, session, sampling, threads)
                draft_tokens = draft_tokens or default_draft_tokens(speculative)
            try:
                _complete(session, prompt, prompt_ids, max_new_tokens, sampling, json_out, proposer, draft_tokens)
            finally:  # a draft or MTP session may hold device memory, like the target's
                close = getattr(proposer, "close", None)
                if close is not None:
                    close()


def _check_speculative(speculative: str | None, draft_tokens: int | None, chat: bool) -> None:
    """Refuse, before loading anything, --speculative options that cannot apply."""
    from edgekit.speculative import check_draft_tokens

    check_draft_tokens(draft_tokens, speculative is not None, speculative)
    if speculative is not None and chat:
        raise EdgekitError("--speculative applies to one completion, not --chat", "drop --chat or --speculative")


def _open(path: Path, profile: str | None, threads: int | None, mmap: bool | None):
    """The session of an export, a build, or a bundle's fitting engine, on its runtime."""
    from edgekit.runtimes.registry import open_engine

    if path.suffix == ".edgepkg":
        from edgekit.bundle import open_bundle

        path = open_bundle(path, profile=profile)  # the fitting engine, unpacked and checked
    elif profile is not None:
        raise EdgekitError("--profile applies to bundles (FILE.edgepkg)", "pass a .edgepkg file, or drop --profile")
    session = open_engine(path, threads=threads, memory_map=mmap)
    if getattr(session, "memory_mapped", False) and mmap is None:
        console.print("[yellow]note:[/] the weights exceed 80% of available memory: they stay memory-mapped "
                      "(ONNX Runtime prepacking off; int4 decode is much slower this way)")
    return session


def _complete(session, prompt, prompt_ids, max_new_tokens, sampling, json_out, proposer=None,
              draft_tokens=None) -> None:
    """One generation from --prompt or --prompt-ids, streamed as text when there is a tokenizer."""
    from edgekit.generate import check_prompt, generate
    from edgekit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(session.graph, required=prompt is not None)
    ids = _prompt_ids(prompt, prompt_ids, tokenizer)
    model = session.graph.model
    # Before any work: a bad id would fail inside ONNX Runtime, an overlong run at its last positions.
    check_prompt(ids, max_new_tokens, model.vocab_size, model.max_position_embeddings)
    stream = None if json_out or tokenizer is None else tokenizer.stream(sys.stdout)
    on_token = stream.push if stream else None
    if proposer is None:
        result = generate(session, ids, max_new_tokens, sampling, model.eos_token_ids, on_token=on_token)
    else:
        from edgekit.speculative import generate_speculative

        result = generate_speculative(session, ids, max_new_tokens, proposer, draft_tokens,
                                      sampling, model.eos_token_ids, on_token=on_token)
    text = tokenizer.decode(result.token_ids) if tokenizer else None
    speculation = _speculation(result)
    if json_out:
        print_json({
            "token_ids": result.token_ids, "text": text, "prompt_tokens": result.prompt_tokens,
            "ttft_ms": result.ttft_ms, "decode_tokens_per_s": result.decode_tokens_per_s,
            "stopped_by": result.stopped_by, "runtime": session.describe(),
            **({"speculative": speculation} if speculation else {}),
        })
        return
    if stream is None:
        sys.stdout.write(",".join(map(str, result.token_ids)))
    sys.stdout.write("\n")
    console.print(
        f"[dim]{len(result.token_ids)} tokens · first token {result.ttft_ms:.1f} ms · "
        f"decode {result.decode_tokens_per_s:.1f} tok/s · {escape(session.describe())}[/]"
    )
    if speculation:
        console.print(f"[dim]speculative: {speculation['accepted']}/{speculation['proposed']} proposed tokens "
                      f"accepted ({speculation['acceptance_rate']:.2f}) · {speculation['mean_accepted']:.2f} "
                      f"accepted per step · {speculation['steps']} steps[/]")


def _speculation(result) -> dict[str, Any] | None:
    """What the proposer contributed, when there was one."""
    if not hasattr(result, "acceptance_rate"):
        return None
    return {"proposed": result.proposed, "accepted": result.accepted, "steps": result.rounds,
            "acceptance_rate": round(result.acceptance_rate, 4), "mean_accepted": round(result.mean_accepted, 4)}


def _chat(session, prompt, max_new_tokens, sampling, json_out, done: dict[str, Any]) -> None:
    """Read user turns from stdin (the first may come from --prompt) until EOF or 'exit'."""
    from edgekit.chat import Conversation, load_chat_template
    from edgekit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(session.graph, required=True)
    conversation = Conversation(session, tokenizer, load_chat_template(session.graph), max_new_tokens, sampling)
    turns = done.setdefault("turns", [])
    for message in _user_turns(prompt):
        turn = conversation.send(message)
        turns.append({"reply": turn.reply, "prefilled_tokens": turn.prefilled_tokens,
                      "token_ids": turn.generation.token_ids, "ttft_ms": turn.generation.ttft_ms,
                      "restarted": turn.restarted, "dropped_messages": turn.dropped})
        if not json_out:
            _show_turn(turn, conversation.context)
    if json_out:
        print_json({"turns": turns, "cached_tokens": session.length})


def _user_turns(first: str | None):
    """--prompt's text, then stdin lines until EOF, 'exit' or 'quit' (prompted on a terminal)."""
    if first is not None:
        yield first
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            console.print("[bold]>>>[/] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        yield line.rstrip("\n")


def _show_turn(turn, context: int) -> None:
    """The reply on stdout; its cost (and whether history was dropped to fit) on stderr."""
    sys.stdout.write(turn.reply + "\n")
    sys.stdout.flush()
    note = " · restarted" if turn.restarted else ""
    if turn.dropped:
        note = f" · restarted: the {turn.dropped} oldest messages dropped to fit the context of {context} tokens"
    console.print(f"[dim]prefilled {turn.prefilled_tokens} tokens · first token "
                  f"{turn.generation.ttft_ms:.1f} ms{note}[/]", soft_wrap=True)
    if not turn.reply.strip():  # a base model given a chat template it never learned answers blank
        console.print("[yellow]note:[/] the reply is blank: this model may not be instruction-tuned (its tokenizer "
                      "has a chat template, its weights may not know it); try --prompt TEXT", soft_wrap=True)


def _prompt_ids(prompt, prompt_ids, tokenizer) -> list[int]:
    if (prompt is None) == (prompt_ids is None):
        raise EdgekitError("pass exactly one of --prompt and --prompt-ids", "e.g. --prompt 'def main():'")
    if prompt is not None:
        return tokenizer.encode(prompt)
    try:
        return [int(x) for x in prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise EdgekitError(f"--prompt-ids {prompt_ids!r} is not a comma-separated list of integers",
                           "e.g. --prompt-ids 1,2,3") from None
