"""Graceful stop on SIGUSR1 (SLURM's pre-emption warning) or SIGTERM: finish the step, checkpoint, exit.

The handler only sets a flag; the training loop reads it once per step and all ranks agree through an
all-reduce, so every rank stops after the same step and the checkpoint is collective. One exception: a signal
while DeepSpeed is still building its op (`in_op_build`) stops the process at once with exit 75, since nothing has
been trained yet and the build would fail anyway (see `StopFlag._handle`).
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

from pretrain.errors import EXIT_ABORT, EXIT_REQUEUE, StoppedError  # noqa: F401 - 3 and 75, with every other code

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Frames of these modules under one of ENGINE_MODULE's: torch/DeepSpeed JIT-building (or loading) an op while the
# engine starts (`engine.init_distributed`, `build_engine`), i.e. before the first step of the run's loop.
OP_BUILD_MODULES = ("torch.utils.cpp_extension", "deepspeed.ops.op_builder")
ENGINE_MODULE = "pretrain.parallel.engine"


def in_op_build(frame: FrameType | None) -> bool:
    """True when `frame` (where a signal found the main thread) is inside an op build the engine's start-up began."""
    modules = set()
    while frame is not None:
        modules.add(str(frame.f_globals.get("__name__", "")))
        frame = frame.f_back
    return ENGINE_MODULE in modules and any(m.startswith(OP_BUILD_MODULES) for m in modules)


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

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signum = signum
        # Only a lone process stops at once: with several ranks, one leaving before the others are told would
        # strand them in the rendezvous (seen under SLURM: rank 1 waited 600 s for rank 0); they agree after step 1.
        if in_op_build(frame) and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            # Stop now: nothing is trained yet, so nothing needs a checkpoint, and waiting would not help: SLURM and
            # torchrun signal the whole process group, so the build's ninja got the signal too and the build fails
            # ("ninja: build stopped"), which used to end the run as an internal error (exit 1, never requeued).
            # Raised here, the exception leaves the build at once (subprocess.run kills ninja, the build lock is
            # released) and `errors.describe` turns it into one line and exit 75.
            raise StoppedError(f"{signal.Signals(signum).name} arrived while DeepSpeed was building its op, before "
                               f"the first step: nothing to checkpoint; exit {EXIT_REQUEUE} (a requeued job resumes "
                               "from the latest checkpoint, or starts the run)")
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
