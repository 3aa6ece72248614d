"""Tokens to text while they stream: incremental detokenization and stop sequences (no jax)."""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"  # what a byte-level BPE decoder gives for an unfinished UTF-8 character


class StopScanner:
    """One sequence's text, token by token. `add(token)` returns (new text, stopped):

    * text comes from decoding a few tokens at a time (the last clean cut onwards), so a step
      costs the same at token 10 and token 2,000; a character split across tokens waits for
      its last byte;
    * the text never reaches into a stop sequence: once one occurs, the text ends before it
      (stopped=True); text that could be the start of one is held back until it cannot.

    The concatenated pieces plus `flush()` equal the whole completion decoded at once (special
    tokens such as <|pad|> left out) and cut before the first stop sequence."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (up to the last clean cut)
        self.sent = 0  # characters handed out
        self.done = False
        self._prefix = self._read = 0  # token offsets: decoded window start, end of the clean text

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)  # no <|pad|> in text (vLLM's default too)

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        if self.done or self.tok is None:
            return "", self.done
        prefix = self._decode(self.ids[self._prefix:self._read])
        new = self._decode(self.ids[self._prefix:])
        if len(new) > len(prefix) and not new.endswith(REPLACEMENT):
            self.text += new[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _first_stop(self, text: str) -> int:
        """Where the first stop sequence starts in text (-1: none); only the text not handed out
        yet, plus what a stop could share with it, is searched."""
        start = max(0, self.sent - self.longest)
        return min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)

    def _release(self) -> tuple[str, bool]:
        text = self.text
        cut = self._first_stop(text)
        if cut >= 0:
            piece, self.sent, self.done = text[self.sent:cut], cut, True
            self.text = text[:cut]
            return piece, True
        hold = 0
        for k in range(min(self.longest - 1, len(text) - self.sent), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                hold = k
                break
        end = len(text) - hold
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        return piece, False

    def flush(self) -> str:
        """The rest of the text at the end of the sequence (held-back text, an unfinished
        character as the decoder renders it)."""
        if self.done or self.tok is None:
            return ""
        self.done = True
        text = self._decode(self.ids)
        cut = self._first_stop(text)
        if cut >= 0:
            text = text[:cut]
        piece, self.sent = text[self.sent:], len(text)
        return piece
