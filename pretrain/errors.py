"""Failures a user can act on: the typed errors, their exit codes, and the one line each becomes.

Every command ends in `cli.main`, which turns any exception into `(exit code, one line)` with `describe` and prints
it with `report`: once (rank 0), no traceback unless `--debug` / `PRETRAIN_DEBUG=1`. The code says what kind of
failure it was, so a batch script can tell "fix the config" (2) from "the checkpoint is broken" (5) or "requeue
me" (75). Errors are raised where the cause is known (the file, the key, the value) and carry that in their
message; the types here only add the exit code.

Each class also derives from the builtin exception it replaces (RuntimeError, ValueError), so code that caught
the old type still catches it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import time

EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected exception: a bug or an unforeseen environment problem (run with --debug)
EXIT_USAGE = 2  # bad config, bad arguments, a missing input file or shard set: fix the command line or the config
EXIT_ABORT = 3  # too many consecutive non-finite losses; the last good checkpoint is kept (the training loops)
EXIT_DEMO_STAGE = 4  # a stage of `pretrain demo` failed (its own message is above)
EXIT_CHECKPOINT = 5  # a checkpoint cannot be read or written (truncated, garbage, missing files, mismatching model)
EXIT_DATA = 6  # the training/eval data is broken (unreadable _info.json, a run of bad samples)
EXIT_SETUP = 7  # the process layout does not fit the config (ep_size vs world size, launcher environment)
EXIT_DISK_FULL = 8  # a checkpoint save ran out of disk space; the previous checkpoint is intact
EXIT_PEER = 9  # another rank failed and left the job; its own error line is in its log file
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpoint written, requeue me" for the SLURM batch script (training.signals)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

# Codes and their meaning, in the order the README's "When something goes wrong" table lists them.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug or an unforeseen problem): rerun with --debug for the traceback",
    EXIT_USAGE: "bad config, arguments or input paths: the message names the key, value or file",
    EXIT_ABORT: "training aborted: too many consecutive non-finite losses; the last good checkpoint is kept",
    EXIT_DEMO_STAGE: "a stage of `pretrain demo` failed",
    EXIT_CHECKPOINT: "a checkpoint cannot be read or written",
    EXIT_DATA: "broken training/eval data",
    EXIT_SETUP: "the process layout (world size, expert parallelism, launcher) does not fit the config",
    EXIT_DISK_FULL: "disk full while saving a checkpoint; the previous checkpoint is intact",
    EXIT_PEER: "another rank failed and left the job: its error is in <output_dir>/logs/rank<N>.log",
    EXIT_REQUEUE: "stopped by a signal after a checkpoint (or before the first step, none needed): requeue the job",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

logger = logging.getLogger(__name__)


class PretrainError(Exception):
    """Base of the typed errors: a one-line message naming the file/key and what to do, and an exit code."""

    exit_code = EXIT_INTERNAL


class CheckpointError(PretrainError, RuntimeError):
    """A checkpoint cannot be read or written (exit 5)."""

    exit_code = EXIT_CHECKPOINT


class DiskFullError(CheckpointError):
    """A checkpoint save ran out of space (exit 8); the partial tag was removed and `latest` is unchanged."""

    exit_code = EXIT_DISK_FULL


class DataError(PretrainError, RuntimeError, ValueError):
    """Training or evaluation data is broken (exit 6)."""

    exit_code = EXIT_DATA


class SetupError(PretrainError, ValueError):
    """The process layout does not fit the config (exit 7)."""

    exit_code = EXIT_SETUP


class AbortedError(PretrainError):
    """A loop met a non-finite loss where it cannot skip the step (exit 3); its last good checkpoint is kept."""

    exit_code = EXIT_ABORT


class StoppedError(PretrainError):
    """A stop signal came where no checkpoint is needed (exit 75): DeepSpeed was still building its op, before the
    first step (`pretrain.training.signals`). A requeued job resumes from the run's latest checkpoint, or starts it."""

    exit_code = EXIT_REQUEUE


class PeerError(PretrainError):
    """This rank is fine but a collective failed because another rank failed and left the job (exit 9)."""

    exit_code = EXIT_PEER


class UsageError(PretrainError):
    """Bad arguments or input paths found by a command handler (exit 2); `cli.UserError` is one."""

    exit_code = EXIT_USAGE


def _usage_types() -> tuple[type, ...]:
    from pretrain.config.pretraining import (
        ConfigError,  # config is below this module: ConfigError stays where configs are
    )

    return ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) says the disk or quota is full. torch's zip writer
    reports a full disk as `inline_container.cc ... unexpected pos` / `file write failed`, not as ENOSPC."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(s in text for s in ("No space left", "unexpected pos", "file write failed", "Disk quota")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def one_line(text: str) -> str:
    """A message on one line (multi-line library messages joined with ' | ')."""
    return " | ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


# How a collective reports a peer that exited (gloo, NCCL): this rank is fine, the cause is in the peer's log.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "DistBackendError",
              "NCCL communicator was aborted")


def peer_gone(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) is a collective failing because another rank left."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(s in f"{type(exc).__name__}: {exc}" for s in _PEER_GONE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ... and a collective that waited out the process group's timeout (gloo; NCCL's watchdog aborts the communicator)
_PEER_TIMEOUT = ("Timed out waiting", "Watchdog caught collective operation timeout")


# a path this process may not read or write: no permission, a read-only filesystem
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def message(exc: BaseException) -> str:
    """The exception's message on one line. An error re-raised from a DataLoader worker carries the worker's whole
    traceback in its message; the original message is its last line, after the exception's type name."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return one_line(text)


def describe(exc: BaseException, command: str) -> tuple[int, str]:
    """The exit code and the one line a user sees for an exception that ended `pretrain <command>`."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"pretrain {command}: interrupted"
    if isinstance(exc, StoppedError):  # a clean stop, not an error
        return exc.exit_code, f"pretrain {command}: stopped: {message(exc)}"
    if isinstance(exc, PretrainError):
        return exc.exit_code, f"pretrain {command}: error: {message(exc)}"
    from pretrain.dist import NodeAddressError, RendezvousError

    if isinstance(exc, RendezvousError):
        return EXIT_PEER, f"pretrain {command}: error: {message(exc)}"
    if isinstance(exc, NodeAddressError):
        return EXIT_SETUP, f"pretrain {command}: error: {message(exc)}"
    if isinstance(exc, _usage_types()):
        return EXIT_USAGE, f"pretrain {command}: error: {message(exc)}"
    if isinstance(exc, OSError) and exc.errno in _NO_ACCESS and exc.filename:  # a path the user chose, not a bug
        return EXIT_USAGE, f"pretrain {command}: error: cannot access {exc.filename}: {exc.strerror}"
    if is_disk_full(exc):
        return EXIT_DISK_FULL, f"pretrain {command}: error: disk full: {message(exc)}"
    first = message(exc) if "Original Traceback" in str(exc) else one_line((str(exc).strip() or " ").splitlines()[0])
    if _distributed() and any(s in f"{type(exc).__name__}: {exc}" for s in _PEER_GONE):
        return EXIT_PEER, (f"pretrain {command}: error: another rank failed and left the job ({type(exc).__name__}: "
                           f"{first[:200]}): its error is in the run directory's logs/rank<N>.log")
    if _distributed() and any(s in str(exc) for s in _PEER_TIMEOUT):
        return EXIT_PEER, (f"pretrain {command}: error: another rank did not answer a collective within the process "
                           f"group's timeout, engine.timeout_s ({first[:200]}): it is stuck or gone; its log is the "
                           "run directory's logs/rank<N>.log")
    return EXIT_INTERNAL, (f"pretrain {command}: internal error: {type(exc).__name__}: {first} "
                           "(run with --debug for the traceback)")


def debug_requested(flag: bool = False) -> bool:
    """`--debug` or PRETRAIN_DEBUG=1 (any value but "", "0", "false", "no")."""
    return flag or os.environ.get("PRETRAIN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _rank() -> int:
    from pretrain import dist

    try:
        return dist.resolve().rank
    except Exception:  # an inconsistent launcher environment is itself the error being reported
        return 0


def _distributed() -> bool:
    tdist = sys.modules.get("torch.distributed")
    return bool(tdist is not None and tdist.is_available() and tdist.is_initialized())


PEER_GRACE_S = 5.0  # how long a failing rank other than 0 waits for rank 0 to report (see `report`)


def report(code: int, line: str) -> int:
    """Print `line` on rank 0's stderr (other ranks put it in their log file), then return `code`.

    With torch.distributed initialised the process ends here with `os._exit(code)`: the other ranks may be
    blocked in a collective waiting for this one, and an ordinary exit would first run the process group's
    teardown (which can wait on them). Once this process is gone, gloo peers fail their pending collective at once
    (they exit 9, "another rank failed") and torchrun/srun stop the remaining workers; NCCL peers fail at the
    process group's timeout. A rank other than 0 first waits `PEER_GRACE_S`: when every rank fails the same way
    (config, checkpoint, full disk), rank 0 prints the line and ends the job meanwhile (torchrun then stops this
    rank); when the failure is this rank's alone, rank 0 is still waiting, so this rank prints its line itself,
    prefixed `[rank N]`.
    """
    rank = _rank()
    if rank == 0:
        print(line, file=sys.stderr)
    elif not _distributed() and code != EXIT_USAGE:
        # failed before joining the process group (a rank-local setup problem): no peer reports it and, under plain
        # srun, nothing stops the other ranks: they end at the rendezvous timeout (exit 9) pointing at this line.
        # A config error is the same on every rank and rank 0 prints it.
        print(f"[rank {rank}] {line}", file=sys.stderr)
    else:
        record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, "%s", (line,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    if _distributed():
        if rank != 0:
            for sig in (signal.SIGUSR1, signal.SIGTERM):  # the graceful-stop flag (training.signals) would keep
                # this process alive through torchrun's SIGTERM
                signal.signal(sig, signal.SIG_DFL)
            time.sleep(PEER_GRACE_S)
            print(f"[rank {rank}] {line}", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        logging.shutdown()
        os._exit(code)
    return code
