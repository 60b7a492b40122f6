"""The export's tokenizer through the `tokenizers` library (no transformers on the device)."""

from __future__ import annotations

from typing import TextIO

from edgekit.errors import ArtifactError
from edgekit.types import ExportedGraph


class TextStream:
    """Prints generated text as tokens arrive, decoding the whole tail so multi-byte
    characters split across tokens come out whole."""

    def __init__(self, tokenizer: "Tokenizer", out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


class Tokenizer:
    """Encode / decode with the export's tokenizer.json."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ArtifactError(f"{path} is not a valid tokenizer.json ({exc})", "re-export the model") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def piece(self, token: int) -> str | None:
        """The token's string in the vocabulary (byte-level BPE spells raw bytes as GPT-2's characters)."""
        return self._tok.id_to_token(token)

    @property
    def byte_level(self) -> bool:
        """Whether pieces are byte-level BPE (each character stands for one raw byte)."""
        from tokenizers import decoders

        return isinstance(self._tok.decoder, decoders.ByteLevel)

    def token_id(self, token: str) -> int | None:
        """The id of a (special) token, or None."""
        return self._tok.token_to_id(token)

    def stream(self, out: TextIO) -> TextStream:
        return TextStream(self, out)


def load_tokenizer(graph: ExportedGraph, required: bool = False) -> Tokenizer | None:
    """The export's tokenizer, or None (an error when ``required``)."""
    path = graph.path / "tokenizer.json"
    if not path.is_file():
        if required:
            raise ArtifactError(
                f"{graph.path} has no tokenizer.json, so --prompt cannot be encoded",
                "pass --prompt-ids 1,2,3, or export from a folder that has tokenizer.json",
            )
        return None
    return Tokenizer(path)
