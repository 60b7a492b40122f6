"""A test proposer shared by the speculative tests: scripted proposals with known rejections."""

from __future__ import annotations

from edgekit.speculative import Proposal


class WrongEveryThird:
    """Proposes the true greedy continuation (``reference``, the tokens after the prompt) with one
    wrong token in two rounds of three, so rounds keep anything from 0 to k tokens."""

    def __init__(self, reference, prompt_len: int, vocab: int = 2048):
        self.reference, self.prompt_len, self.vocab, self.calls = reference, prompt_len, vocab, 0

    def propose(self, context, k):
        self.calls += 1
        start = len(context) - self.prompt_len
        tokens = list(self.reference[start:start + k])
        if tokens and self.calls % 3:
            i = self.calls % len(tokens)
            tokens[i] = (tokens[i] + 1) % self.vocab
        return Proposal(tokens)

    def observe(self, context, first, hidden):
        pass
