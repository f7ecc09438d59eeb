"""Where generated tokens become text: incremental detokenisation and the stop strings, in one place.

Each token is decoded together with the few tokens before it (so word-initial spaces and multi-byte
characters come out as they do in a whole decode) and only the new characters are kept, which costs the
same at every step. Stop strings are matched on the generated text only, as users read it (special tokens
skipped): the text is cut before the first match and the sequence ends there. Until a sequence ends, the
last `len(longest stop) - 1` characters are held back, since a stop string might still claim them.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"  # what a decode shows for a multi-byte character cut in the middle


class TextStream:
    """The text of one generated sequence, grown a token at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)  # non-empty: DecodeConfig refuses empty ones
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string once one matched
        self.stopped = False
        self._prefix = self._read = 0  # ids[_prefix:_read] were decoded already; ids[_read:] not yet
        self._emitted = 0
        self._hold = max((len(s) - 1 for s in self.stops), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        """Add one generated token; sets `stopped` when the text now contains a stop string."""
        self.ids.append(token)
        if self.stopped:
            return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return  # nothing visible yet (a special token, or half a character)
        self._extend(after[len(before) :])
        self._prefix, self._read = self._read, len(self.ids)

    def _extend(self, new: str) -> None:
        start = max(0, len(self.text) - self._hold)
        self.text += new
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True

    def finish(self) -> None:
        """The sequence ended: whatever is still undecoded (half a character) becomes text as it is."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            if len(after) > len(before):
                self._extend(after[len(before) :])
            self._read = len(self.ids)

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; unless `final`, without what a stop string might still claim."""
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._hold)
        new, self._emitted = self.text[self._emitted : end], end
        return new


def vocabulary_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every token's text alone, by id (special tokens included). A fast tokenizer's own batch decode (Rust) takes
    ~0.1 s for a 49k vocabulary where `batch_decode`'s loop over tokens takes ~1 s; the texts are the same."""
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)
