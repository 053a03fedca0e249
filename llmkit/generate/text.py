"""Token ids -> text, one token at a time: UTF-8 safe streaming and stop strings.

Byte-level BPE splits multi-byte characters across tokens, so the text of the tokens so far can end
in half a character (decoded as U+FFFD). `TextTracker` never emits such a tail, holds back any tail
that could still become a stop string, and cuts the text where a stop string starts (the stop
string itself is not part of the result, as in the OpenAI API). The chunks it emits therefore join
to exactly the final text.

`IncrementalDecoder` gives the decoded text of a growing list of ids in time linear in its length
(re-decoding everything per token is quadratic: 63 s for an 8,000-token echo).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """`tokenizer.decode(ids)` of a list that grows one id at a time, without decoding it all again.

    The text up to a checkpoint is kept; only the ids after it are decoded, together with a few ids
    before it (a window) whose text is subtracted again. The window makes this exact for decoders
    that treat the first token of a decode call specially (SentencePiece's leading space) or that
    see a multi-byte character split across tokens. A checkpoint is only taken where the text does
    not end in half a character (U+FFFD), so the text before it never changes.
    """

    WINDOW = 4

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.committed = ""  # the text of the ids up to the last checkpoint
        self.start = 0  # the window's first id
        self.head = ""  # the text of the window's ids up to the checkpoint, subtracted again
        self.text = ""  # decode(ids)

    def push(self, token_id: int) -> str:
        """Append one id; returns the whole text so far."""
        self.ids.append(token_id)
        window = self.tokenizer.decode(self.ids[self.start:])
        if not window.startswith(self.head):  # the window's first ids decoded differently: decode it all
            self.start, self.head, self.committed = 0, "", ""
            window = self.tokenizer.decode(self.ids)
        self.text = self.committed + window[len(self.head):]
        if not self.text.endswith(REPLACEMENT):
            self.committed = self.text
            self.start = max(0, len(self.ids) - self.WINDOW)
            self.head = self.tokenizer.decode(self.ids[self.start:])
        return self.text


class TextTracker:
    """The decoded text of one generated sequence and the part of it not yet streamed."""

    def __init__(self, tokenizer, stop_strings: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""  # the final text once `finished`
        self.sent = 0  # characters of text already streamed
        self.stopped = False  # a stop string was found

    def push(self, token_id: int | None) -> str:
        """Add a token (None adds nothing) and return the text that is now safe to stream."""
        full = self.decoder.push(token_id) if token_id is not None else self.decoder.text
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
        """Where the first stop string starts; only the unsent text can hold one (the sent text was
        checked when it was sent, and a possible stop's beginning is held back)."""
        hits = [i for i in (text.find(s, self.sent) for s in self.stop_strings) if i >= 0]
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
