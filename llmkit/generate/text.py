"""Token ids -> text, one token at a time: UTF-8 safe streaming and stop strings.

Byte-level BPE splits multi-byte characters across tokens, so the text of the tokens so far can end
in half a character (decoded as U+FFFD). `TextTracker` never emits such a tail, holds back any tail
that could still become a stop string, and cuts the text where a stop string starts (the stop
string itself is not part of the result, as in the OpenAI API). The chunks it emits therefore join
to exactly the final text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextTracker:
    """The decoded text of one generated sequence and the part of it not yet streamed."""

    def __init__(self, tokenizer, stop_strings: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # the final text once `finished`
        self.sent = 0  # characters of text already streamed
        self.stopped = False  # a stop string was found

    def push(self, token_id: int | None) -> str:
        """Add a token (None adds nothing) and return the text that is now safe to stream."""
        if token_id is not None:
            self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        stable = full.rstrip(REPLACEMENT)  # half a character may still be completed
        cut = self._find_stop(stable)
        if cut is not None:
            self.stopped = True
            self.text = stable[:cut]
            return self._emit(len(self.text))
        self.text = full
        return self._emit(len(stable) - self._held_back(stable))

    def finish(self) -> str:
        """The rest of the text once the sequence has ended (no more tokens will come)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        chunk = self.text[self.sent:upto]
        self.sent = upto
        return chunk

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
