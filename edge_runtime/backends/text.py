"""Turn a stream of token byte pieces into text: whole UTF-8 characters, stop strings held back.

Shared by every backend so that streaming behaves the same whatever runs the model.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.backends.params import SamplingParams


class StreamingText:
    """Accumulates token pieces and releases text that can no longer change.

    Text is held back while it ends in an incomplete UTF-8 sequence or in a prefix of one of the
    stop strings; once a stop string appears, everything from it on is dropped.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # decoded but not yet released
        self.stopped = False

    @classmethod
    def for_params(cls, params: SamplingParams) -> StreamingText:
        """The text of a generation ``params`` asks for: its stop strings, none under a grammar
        (the grammar says where the answer ends; a stop string could cut it mid-structure)."""
        return cls(() if params.constrained else params.stop)

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text now safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        cut = self._find_stop()
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._held_suffix_length()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        """Release whatever is held back (at the end of a generation)."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out

    def _find_stop(self) -> int:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else -1

    def _held_suffix_length(self) -> int:
        # The longest tail of the pending text that could still grow into a stop string.
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
