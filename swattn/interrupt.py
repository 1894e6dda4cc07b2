"""Ctrl-C that lets the work in flight finish: the first one asks to stop, a second one stops at once.

Long loops (training steps, prefill chunks, decode steps) check :class:`StopOnInterrupt`
between steps, so whatever they keep (a checkpoint, a KV cache, the text so far) is never
left half updated by an exception landing in the middle of a step.
"""

from __future__ import annotations

import signal
import sys


class StopOnInterrupt:
    """While active, SIGINT sets ``requested``; a second SIGINT raises ``KeyboardInterrupt``.

    Args:
        message: printed on stderr at the first Ctrl-C (None: nothing).

    Use as a context manager; outside the main thread it does nothing (Ctrl-C raises where it
    lands, as usual).
    """

    def __init__(self, message: str | None = None):
        self.message = message
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __call__(self) -> bool:
        """True once Ctrl-C was pressed: a ``should_stop`` callback."""
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
