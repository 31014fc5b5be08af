"""Rank, world size and local rank for the whole package: torchrun, SLURM or a single process.

This is the only module that reads SLURM's environment. `resolve()` is pure (it takes the environment as a mapping),
so every launcher is testable without launching anything; `export()` writes the resolved values back as the
variables torch.distributed, DeepSpeed and WebDataset read (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`), because `deepspeed.init_distributed` only understands torchrun's/MPI's variables.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[003-005,007],cpu1' -> 'gpu003'.

    Uses `scontrol show hostnames` when available (authoritative), else parses the bracket syntax itself.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head or not head.group(1):
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_id: int) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return 10000 + job_id % 20000


def resolve(env: Mapping[str, str] | None = None) -> DistInfo:
    """Resolve the process's place in the job. torchrun's `RANK` wins over `SLURM_PROCID`.

    Under `srun torchrun`, SLURM_PROCID is the node index, so torchrun's variables must take precedence.
    Raises ValueError naming the variable when the environment is inconsistent.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "SLURM_JOB_NODELIST" not in env and "MASTER_ADDR" not in env:
            raise ValueError("SLURM job without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master host")
        job_id = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        info = DistInfo(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(job_id),
            launcher="slurm",
        )
    else:
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        return DistInfo(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size} ({info.launcher} environment)")
    return info


def export(info: DistInfo, env: dict[str, str] | None = None) -> None:
    """Write the resolved values as torchrun-style variables (what DeepSpeed and WebDataset read)."""
    env = os.environ if env is None else env
    port = info.master_port
    if info.launcher == "single" and "MASTER_PORT" not in env:
        port = free_port()  # a fixed default would collide with any other single-process run on this machine
    env.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(port),
    )


def free_port() -> int:
    """A TCP port free on this host right now (for single-process runs, which need a process group too)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_backend(backend: str) -> str:
    """`engine.backend` → torch.distributed backend: auto = nccl with CUDA, gloo without. Raises NodeAddressError
    (exit 7) when gloo could not connect the job's nodes (`gloo_address_problem`)."""
    import torch

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"engine.backend={backend!r} is not one of auto, nccl, gloo")
    if backend == "gloo" and (problem := gloo_address_problem()):
        raise NodeAddressError(problem)
    return backend


class NodeAddressError(RuntimeError):
    """This node's address cannot connect a multi-node gloo job (exit 7, `errors.describe`)."""


def gloo_address_problem(env: Mapping[str, str] | None = None, hostname: str | None = None) -> str | None:
    """Why gloo could not connect the nodes of this SLURM job, or None (one node, or GLOO_SOCKET_IFNAME set).

    Without GLOO_SOCKET_IFNAME, gloo listens on the address the node's own hostname resolves to (falling back to the
    loopback when it does not resolve) and tells the other ranks to connect there. A hostname that resolves only to
    a loopback address (Debian's `127.0.1.1 <hostname>` line in /etc/hosts) works on one node, but a rank on
    another node then connects to its own loopback: every rank would wait out the process-group timeout.
    """
    import ipaddress
    import socket

    env = os.environ if env is None else env
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    if env.get("GLOO_SOCKET_IFNAME") or not nodes.isdigit() or int(nodes) < 2:
        return None
    hostname = hostname or socket.gethostname()
    fix = ("set GLOO_SOCKET_IFNAME=<the interface of the nodes' network> in the job script (slurm/train.sbatch, "
           "'edit for your cluster') or make the node's hostname resolve to that network's address")
    try:
        addrs = sorted({info[4][0] for info in socket.getaddrinfo(hostname, None)})
    except OSError as exc:
        return f"this node's hostname {hostname!r} does not resolve ({exc}), so gloo would listen on the loopback " \
               f"and the ranks on the job's other {int(nodes) - 1} node(s) could not connect: {fix}"
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        return f"this node's hostname {hostname!r} resolves only to the loopback ({', '.join(addrs)}), so gloo would " \
               f"listen there and the ranks on the job's other {int(nodes) - 1} node(s) could not connect: {fix}"
    return None


def init_process_group(backend: str = "auto", timeout_s: float = 600.0) -> None:
    """Plain torch.distributed init from the exported env (for processes without a DeepSpeed engine)."""
    import datetime

    import torch
    import torch.distributed as tdist

    name = resolve_backend(backend)
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    with rendezvous(timeout_s):
        tdist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout_s))


class RendezvousError(RuntimeError):
    """Not every rank joined the process group in time (exit 9, `errors.describe`)."""


@contextlib.contextmanager
def rendezvous(timeout_s: float) -> Iterator[None]:
    """Around a process-group init: a rank that never joins (it failed before its first collective, under a launcher
    that does not stop the others, such as plain srun) or an unreachable MASTER_ADDR is a `RendezvousError` after
    `timeout_s`, naming the address and the setting, not torch's store traceback."""
    import torch.distributed as tdist

    try:
        yield
    except (tdist.DistStoreError, tdist.DistNetworkError) as exc:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())[:200]
        raise RendezvousError(f"a rank did not join the process group at {where} within engine.timeout_s="
                              f"{timeout_s:g} ({first}): another rank failed before joining (see its log) or cannot "
                              "reach that address") from exc


def _multi_process() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _reduce(tensor, op_name: str):
    import torch
    import torch.distributed as tdist

    if not _multi_process():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else tensor.device
    work = tensor.detach().to(device, copy=True)
    tdist.all_reduce(work, op=getattr(tdist.ReduceOp, op_name))
    return work.to(tensor.device)


def all_reduce_max(tensor):
    """Element-wise max over all ranks (identity in a single process). Used for agreement flags."""
    return _reduce(tensor, "MAX")


def all_reduce_sum(tensor):
    """Sum over all ranks (identity in a single process)."""
    return _reduce(tensor, "SUM")


def all_gather_objects(obj) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` (`[obj]` in a single process). Pickles between our own ranks only:
    pass plain data (lists of numbers), never anything read from outside."""
    import torch.distributed as tdist

    if not _multi_process():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out
