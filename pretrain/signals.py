"""Graceful stop on SIGUSR1 (SLURM's pre-emption warning) or SIGTERM: finish the step, checkpoint, exit.

The handler only sets a flag; the training loop reads it once per step and all ranks agree through an
all-reduce, so every rank stops after the same step and the checkpoint is collective.
"""

from __future__ import annotations

import logging
import signal

from pretrain.errors import EXIT_ABORT, EXIT_REQUEUE  # noqa: F401 - 3 and 75, with every other exit code

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by STOP_SIGNALS; `requested` is polled by the loop."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal API
        self.requested = True
        self.signum = signum
        logger.warning("received %s: will checkpoint after this step and exit %d",
                       signal.Signals(signum).name, EXIT_REQUEUE)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_PROCESS_FLAG: StopFlag | None = None


def stop_flag() -> StopFlag:
    """The process's stop flag, installed on the first call. The CLI calls it before the heavy imports: a signal
    that arrives while a job is still starting (tens of seconds) is then a stop request, not a dead rank."""
    global _PROCESS_FLAG
    if _PROCESS_FLAG is None or not _PROCESS_FLAG._previous:
        _PROCESS_FLAG = StopFlag().install()
    return _PROCESS_FLAG
