"""Multi-turn chat over one session: the cache (KV and recurrent states) persists between turns,
so each turn prefills only its own tokens.

The chat template comes from the export's tokenizer_config.json (or chat_template.jinja) and is
rendered with Jinja2, as transformers does. Each turn renders the whole conversation and feeds
only the text past what the cache already holds; if the template rewrites history (some do), the
conversation is re-prefilled from scratch rather than continued wrongly. When the next turn
would not fit the context (its prompt plus ``max_new_tokens``), the oldest exchanges are dropped
and what remains is re-prefilled; a single message too long for the context is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgekit.errors import ArtifactError, EdgekitError
from edgekit.generate import Generation, Sampling, context_problem, generate
from edgekit.tokenizer import Tokenizer

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def load_chat_template(graph: Any) -> str:
    """The export's chat template, or an error saying where it looked."""
    jinja = graph.path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = graph.path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:  # a base or code model (the tiny-code preset): chat turns would mean nothing to it
        raise ArtifactError(
            f"{graph.path} has no chat template (in tokenizer_config.json or chat_template.jinja): "
            f"{graph.model.source} is not a chat model, so --chat cannot talk to it",
            "continue a text instead: --prompt TEXT without --chat (e.g. --prompt 'def main():'), "
            "or export an instruction-tuned model whose tokenizer has a chat template")
    return template


@dataclass
class Turn:
    """One exchange: the reply and what it cost."""

    reply: str
    prefilled_tokens: int
    generation: Generation
    restarted: bool
    dropped: int = 0  # earlier messages forgotten so that this turn fits the context


class Conversation:
    """Keeps messages, the text the cache holds, and the session between turns."""

    def __init__(self, session: Any, tokenizer: Tokenizer, template: str, max_new_tokens: int = 256,
                 sampling: Sampling = Sampling(), system: str | None = None):
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        self.template = env.from_string(template)
        self.session, self.tokenizer = session, tokenizer
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cached_text = ""  # the conversation's text so far: the cache plus ``pending``
        self.ids: list[int] = []  # the same as token ids
        self.pending: list[int] = []  # the last generated token, never fed back yet
        ids = [tokenizer.token_id(t) for t in END_OF_TURN]
        graph = session.graph
        self.context = graph.model.max_position_embeddings
        self.stop_ids = tuple(graph.model.eos_token_ids) + tuple(i for i in ids if i is not None)
        self.session.reset(0)

    def render(self, add_generation_prompt: bool, messages: list[dict[str, str]] | None = None) -> str:
        return self.template.render(messages=self.messages if messages is None else messages,
                                    add_generation_prompt=add_generation_prompt, bos_token="", eos_token="")

    def send(self, text: str) -> Turn:
        """Add a user message, generate the reply, keep everything cached.

        A message that cannot fit the context even alone is refused (EdgekitError) and not kept.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        full, new_ids, restarted = self._continue(messages)
        dropped = 0
        if restarted:  # the template changed earlier text, or the history must shrink: start over
            messages, full, new_ids, dropped = self._fit(messages)
            self.session.reset(0)
            self.cached_text, self.ids, self.pending = "", [], []
        self.messages = messages
        result = generate(self.session, new_ids, self.max_new_tokens, self.sampling, self.stop_ids, keep_cache=True)
        reply = self.tokenizer.decode([t for t in result.token_ids if t not in self.stop_ids])
        self.cached_text = full + self.tokenizer.decode(result.token_ids, skip_special_tokens=False)
        self.ids += new_ids + result.token_ids[:-1]
        self.pending = result.token_ids[-1:]
        self.messages.append({"role": "assistant", "content": reply})
        return Turn(reply, len(new_ids), result, restarted, dropped)

    def _continue(self, messages: list[dict[str, str]]) -> tuple[str, list[int], bool]:
        """The rendered conversation and the ids that continue the cache; restart = True when the
        cache cannot be continued (the template rewrote history, or the turn would outgrow the context)."""
        full = self.render(add_generation_prompt=True, messages=messages)
        if not full.startswith(self.cached_text):
            return full, [], True
        new_ids = self.pending + self.tokenizer.encode(full[len(self.cached_text):])
        fits = len(self.ids) + len(new_ids) + self.max_new_tokens <= self.context
        return full, new_ids, not fits

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, list[int], int]:
        """The conversation from scratch, dropping the oldest exchanges until it fits the context with
        ``max_new_tokens`` to spare; the system prompt and the new message are always kept."""
        first = 1 if messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            full = self.render(add_generation_prompt=True, messages=messages)
            ids = self.tokenizer.encode(full)
            problem = context_problem(len(ids), self.max_new_tokens, self.context)
            if problem is None:
                return messages, full, ids, dropped
            # The oldest exchange: a user message and what follows it up to the next user message.
            end = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
            if end is None:
                raise EdgekitError(f"the message does not fit: {problem}",
                                   "send a shorter message, or lower --max-new-tokens")
            dropped += end - first
            messages = messages[:first] + messages[end:]
