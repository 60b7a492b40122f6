"""Grammar-constrained decoding: ``response_format`` (json_object, json_schema) and forced tool calls.

A :class:`Constraint` masks each step's logits to the tokens the grammar allows next and
advances on the sampled token; once the grammar is complete only end-of-sequence is allowed,
so the reply ends exactly where the JSON does.

The library is llguidance. Measured on this project's CPU machine while it was shared by several
jobs (the integrator may re-measure), following a 27-38 token document of a 3-field JSON schema
(one mask per step, then the token's advance), on the tiny preset's 2048-token vocabulary and on
byte-level BPE vocabularies trained locally to 8k / 32k / 64k tokens. Mask per token, median
(p90), in microseconds; setup = the tokenizer's index + the first grammar, in ms:

    vocabulary     2k          8k          32k          64k          setup 2k / 64k   install (deps)
    llguidance     17 (68)     15 (51)     20 (85)      28 (112)     23 / 533         7.6 MB (none)
    outlines-core  31 (54)     53 (126)    260 (546)    641 (1709)   12 / 437         5.3 MB (none)
    xgrammar       5 (7)       5 (13)      17 (37)      51 (96)      18 / 582         3.9 MB + 13 MB tvm-ffi;
                                                                                      requires torch,
                                                                                      transformers, triton

(outlines-core's figure is its list of allowed ids, before any mask is built from it.) The whole
:meth:`Constraint.mask` here (fill, unpack to a boolean mask, -inf where forbidden) took 32 us at
2k and 105 us at 64k, against ~1.8 ms per decoded token of the tiny model on the same machine.

xgrammar is the fastest per token, but its mask lives in a torch tensor and the package requires
torch and transformers, which the device side never installs. outlines-core walks a regex DFA x
vocabulary index: its per-token cost grows about linearly with the vocabulary (20x from 2k to 64k)
and it cannot express recursive schemas. llguidance walks the token trie, pruning at the first byte
the lexer rejects, so its cost barely grows with the vocabulary (1.6x from 2k to 64k); it has no
dependencies, fills a NumPy bitmask, and takes Lark grammars with embedded JSON schemas (the
tool-call wrappers below).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.serve.protocol import ApiError

# Compact JSON: a free-whitespace grammar lets a weak model pad forever instead of closing the object.
COMPACT = {"whitespace_flexible": False}


class GrammarTokens:
    """The tokenizer as llguidance sees it (built once per server: it indexes the whole vocabulary)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: tuple[int, ...]):
        import llguidance

        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids))
        self.vocab_size = vocab_size

    def constraint(self, grammar: str, param: str) -> "Constraint":
        """A fresh matcher for ``grammar``; a grammar that does not compile is a 400 naming ``param``."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ApiError(400, f"{param}: {matcher.get_error()}", param=param)
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """A logits processor for one request: ``mask(logits)`` before sampling, ``accept(token)`` after."""

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.numpy as lln

        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = lln.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32
        self._fill = lln.fill_next_token_bitmask

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` (vocab,) with every token the grammar forbids at -inf."""
        self._fill(self.matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]  # (vocab,)
        if not allowed.any():  # sampling an all -inf row would fail; this request ends with an error instead
            reason = self.matcher.get_error() if self.matcher.is_error() else "no token of the vocabulary fits"
            raise EdgekitError(f"the grammar allows no next token ({reason})",
                               "simplify the schema or grammar, or send the request without it")
        return np.where(allowed.astype(bool), logits, -np.inf)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for a chat ``response_format`` (None: unconstrained text)."""
    import llguidance

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=COMPACT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' object",
                           param="response_format")
        return llguidance.LLMatcher.grammar_from_json_schema(spec.get("schema") or {}, overrides=COMPACT)
    raise ApiError(400, f"response_format.type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                   param="response_format")


def tool_call_grammar(family: str, tools: list[dict[str, Any]]) -> str:
    """A Lark grammar that admits exactly one call of one of ``tools`` in ``family``'s format."""
    key = "parameters" if family == "llama3" else "arguments"
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", key],
              "properties": {"name": {"const": t["function"]["name"]},
                             key: t["function"].get("parameters") or {"type": "object"}}} for t in tools]
    schema = {"anyOf": calls, "x-guidance": COMPACT} if len(calls) > 1 else {**calls[0], "x-guidance": COMPACT}
    body = f"%json {json.dumps(schema)}"
    if family == "llama3":
        return f"start: call\ncall: {body}\n"
    return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {body}\n'
