"""Streaming text out of a decode loop: incremental detokenising plus stop strings.

`StreamDecoder` lives in `qwen3moe.io.tokenizer` (no MindSpore import there) and is re-exported.
`StopStringStream` adds vLLM-style stop strings on top: the stream ends at the stop string that is
completed first, which is not emitted (vLLM's default `include_stop_str_in_output=False`), and a
text suffix that could still grow into a stop string is held back until it cannot.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from qwen3moe.io.tokenizer import StreamDecoder, SupportsDecode

__all__ = ["StreamDecoder", "StopStringStream"]


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    A stop string can only start inside that suffix (every earlier start was already ruled out),
    so everything before it is final.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Start of the stop string that ends first in `text` (ties: the one starting first), or None.

    "Ends first" is what a decode loop sees: generation halts on the token completing it, so a
    longer stop string starting earlier but ending later never completes.
    """
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


class StopStringStream:
    """Feed ids; get printable text that stops before the first stop string.

    Invariant: `"".join(pieces) + flush()` == `decode(ids)` cut before the stop string that ends
    first (the whole text when none occurs).  `stopped` turns True at the id that completes a stop
    string; later ids are ignored.
    """

    def __init__(self, tokenizer: SupportsDecode, stop_strings: Iterable[str] = (),
                 skip_special_tokens: bool = False) -> None:
        self.stops = [s for s in stop_strings if s]
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.pending = ""  # decoded text not emitted yet (a possible stop-string start)
        self.stopped = False

    def _emit(self, final: bool) -> str:
        cut = _first_stop(self.pending, self.stops)
        if cut is not None:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = 0 if final else _held_suffix(self.pending, self.stops)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final ('' once stopped)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of stream: emit what is held (an unfinished stop-string prefix is plain text)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._emit(final=True)
