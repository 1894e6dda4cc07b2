"""Streaming generated tokens as text, byte-exact.

A character whose UTF-8 bytes are spread over several tokens (byte-level or byte-fallback
tokens: "€", CJK, emoji) is held back until its last byte arrives, through the
``tokenizers`` library's streaming decoder; :meth:`TextStream.finish` then emits whatever
makes the streamed text equal ``tokenizer.decode(tokens)`` exactly.
"""

from __future__ import annotations


class TextStream:
    """Text pieces for tokens as they are generated; their concatenation is the decoded text.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        skip_special_tokens: leave special tokens (``<eos>``, ``<end_of_turn>``) out of the text.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        """Adds a token; gives the text it completes ("" while a character is incomplete)."""
        self.tokens.append(token)
        piece = self._stream.step(self.tokenizer, token) or ""
        self.text += piece
        return piece

    def finish(self) -> str:
        """Gives the rest of ``tokenizer.decode(tokens)`` (e.g. an incomplete last character as decode renders it)."""
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        if not full.startswith(self.text):  # cannot happen with a consistent decoder; never emit a wrong prefix twice
            raise RuntimeError("streamed text diverged from the decoded text")
        rest = full[len(self.text):]
        self.text = full
        return rest
