"""Who may use an engine at once, in an actor whose methods run on more than one thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class EngineGate:
    """Reads (scoring) together where the engine allows it (`shared_reads`: the hf engine's
    forwards change no state; vLLM's and SGLang's engines are not thread-safe), a weight update
    alone: no forward ever sees half-updated weights. A waiting update goes before new reads,
    so that a stream of HTTP requests cannot hold a sync back."""

    def __init__(self, shared_reads: bool) -> None:
        self.shared_reads = shared_reads
        self._changed = threading.Condition()
        self._readers, self._writing, self._writers_waiting = 0, False, 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._writing and not self._writers_waiting
                                   and (self.shared_reads or not self._readers))
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._changed:
            self._writers_waiting += 1
            self._changed.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()
