"""Signals held where an exception would do harm and delivered where it is safe."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager, suppress


class HeldSignals:
    """Ctrl-C and SIGTERM raised only inside `delivered()` blocks. Outside them a signal is held (`held`), for the
    caller to stop at its next safe point, and raised at the next block's start or when the `with` ends, also
    when an error ends it: the user asked to stop, so the error becomes the interrupt's context, not its
    replacement. A second signal while one is held is raised at once: the user will not wait (for a hung server,
    say); what that cuts in half is repaired as after a crash (`fmnist doctor`, a search's heartbeats).

    Python runs signal handlers in the main thread only. A block in another thread (a search trial with
    tune.n_jobs > 1) gets the signal at its own checkpoints instead: its start and each `on_epoch_end` (this is a
    training callback) raise it there, and it stays held so that every such thread stops."""

    NOTE = "stopping at the next safe point (Ctrl-C again stops at once)"

    def __init__(self, note: str = NOTE):
        self.note = f"fmnist: Ctrl-C: {note}\n".encode()  # what the first Ctrl-C prints where it is held
        self.held: int | None = None
        self.open = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> HeldSignals:
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                if callable(handler := signal.getsignal(signum)):  # KeyboardInterrupt, cli's Terminated
                    self.previous[signum] = handler
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind, error, trace) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if kind is None or issubclass(kind, Exception):  # not over a KeyboardInterrupt or SystemExit already going
            self._raise_held()

    def _handle(self, signum: int, frame) -> None:
        if self.held is not None and not self.open:  # a second one: the user will not wait for the safe point
            self.previous[signum](signum, None)  # `held` stays set, so that threads stop at their checkpoints too
        self.held = signum
        if self.open:
            self._raise_held()
        elif signum == signal.SIGINT:  # os.write: print() here could re-enter a write the main thread is in
            with suppress(OSError):  # stderr closed or a broken pipe: the note is not worth an error
                os.write(2, self.note)

    def _raise_held(self) -> None:
        if self.held is not None:
            signum, self.held = self.held, None
            self.previous[signum](signum, None)

    @contextmanager
    def delivered(self):
        if threading.current_thread() is not threading.main_thread():
            self.checkpoint()
            yield  # the main thread is Optuna's bookkeeping: the handler there must not raise, so `open` stays off
            return
        self.open = True
        try:
            self._raise_held()
            yield
        finally:
            self.open = False

    @contextmanager
    def postponed(self):
        """Inside a `delivered()` block, hold signals for a moment (a database write that must not be cut in
        half) and deliver a held one after it. Other threads get no signals, only checkpoints: nothing to hold."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        was_open, self.open = self.open, False
        try:
            yield
        finally:
            self.open = was_open
        if was_open:
            self._raise_held()

    def checkpoint(self) -> None:
        """Outside the main thread, raise the held signal here; it stays held for the other threads."""
        signum = self.held  # read once: the main thread's handler may set it at any moment
        if signum is not None and threading.current_thread() is not threading.main_thread():
            self.previous[signum](signum, None)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.checkpoint()
