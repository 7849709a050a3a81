"""SIGTERM/SIGINT during a run: honoured within one step everywhere.

Inside the training steps a signal only sets a flag: the loop writes a checkpoint at the next step boundary
and stops (``TrainingInterrupted``). Everywhere else in a run — building the corpora, training the tokenizer,
base pretraining, the evaluations before and after — there is no step to finish and nothing to save, so the
signal stops the run at once with :class:`Interrupted` (raised from the handler, like ``KeyboardInterrupt``),
instead of being noted and ignored until the first training step. A second SIGINT always aborts.
"""
from __future__ import annotations

import signal
import sys
import threading


class Interrupted(RuntimeError):
    """A signal stopped a run: outside its training steps this, inside them its subclass
    :class:`~desmoe.train.guards.TrainingInterrupted` (after a checkpoint); ``exit_code`` is 128 + the signal
    number for both."""

    def __init__(self, signame: str, checkpoint: str | None = None, message: str | None = None):
        self.signame, self.checkpoint = signame, checkpoint
        self.exit_code = 128 + int(getattr(signal, signame, signal.SIGTERM))
        if message is not None:
            msg = message
        elif checkpoint:
            msg = (f"{signame} received: the last checkpoint {checkpoint} is written; stopped before the final "
                   f"evaluation (summary.json not written; `desmoe eval --checkpoint {checkpoint}` evaluates it)")
        else:
            msg = (f"{signame} received outside the training steps (building corpora, training the tokenizer, base "
                   f"pretraining or evaluation): stopped at once; no new checkpoint was written, run the same "
                   f"command again to continue")
        super().__init__(msg)


class StopFlag:
    """Installs the SIGTERM/SIGINT handlers of a run (main thread only) and restores the previous ones on exit.

    ``signame``: the signal received, if any. ``defer(True)`` around the training steps: signals only set the
    flag (the loop checks it at each step boundary); ``defer(False, checkpoint=...)`` after them: a signal that
    arrived meanwhile raises :class:`Interrupted` now, and later ones at once.
    """

    def __init__(self):
        self.signame: str | None = None
        self.deferring = False
        self.checkpoint: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name
        if not self.deferring:
            raise Interrupted(self.signame, self.checkpoint)
        try:
            print(f"desmoe train: {self.signame} received: writing a checkpoint at the end of this step"
                  + (" (Ctrl-C again aborts without one)" if signum == signal.SIGINT else ""), file=sys.stderr,
                  flush=True)
        except Exception:
            pass

    def defer(self, on: bool, checkpoint: str | None = None) -> None:
        self.deferring = on
        if checkpoint is not None:
            self.checkpoint = checkpoint
        if not on and self.signame is not None:
            raise Interrupted(self.signame, self.checkpoint)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
