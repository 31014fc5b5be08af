"""A real one-node SLURM cluster (Debian's slurm-wlm + munge) for tests, and helpers to drive its jobs.

Use it from a test module with `from cluster import slurm_cluster  # noqa: F401`: the `slurm` fixture yields the
environment `SLURM_CONF` included, that clients and `pretrain submit` need. The daemons need root; `.ci/run`
installs the packages. Elsewhere the fixture skips, in CI it fails. One cluster per session: every module that
imports the fixture gets the same one, stopped at the end of the session.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import free_port

NEEDED = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "srun", "sbatch", "sinfo", "scontrol")
# the job states in which a job has ended (squeue/scontrol)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
_RUNNING: dict[str, dict] = {}  # the session's cluster environment, shared by every module's fixture instance


def _slurmd_cpus() -> int:
    """What slurmd itself will register (a larger CPUs= marks the node INVALID), e.g. under a CPU quota."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"\bCPUs=(\d+)", out)
    return int(found.group(1)) if found else os.cpu_count()


def _slurm_conf(d: Path) -> str:
    host = socket.gethostname().split(".")[0]
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10
    return "\n".join([
        "ClusterName=pretrain-test", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        # jobs' rendezvous port is dist.slurm_port(job id) = 10000 + id: start the ids where that port is free now
        # (every test cluster starting at job 1 made two concurrent runs both use port 10001)
        f"FirstJobId={free_port(10001, 30000) - 10000}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={_slurmd_cpus()} RealMemory={mem_mib} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
    ])


def _munge_works() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    return cred.returncode == 0 and subprocess.run(
        ["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0


def _start_munge() -> None:
    # A socket file can outlive its daemon (a finished session, a package postinst): test the daemon, not the file.
    if _munge_works():
        return
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob("munge*"):
        stale.unlink()
    shutil.chown(run, "munge", "munge")
    subprocess.run(["munged", "--force"], check=True, capture_output=True, timeout=30)
    assert _munge_works(), "munged started but `munge -n | unmunge` fails"


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"(no {path})"


def start(d: Path) -> dict:
    """Start munged (if needed), slurmctld and slurmd with their state under `d`; returns the client env."""
    (d / "state").mkdir(exist_ok=True)
    (d / "spool").mkdir(exist_ok=True)
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _start_munge()
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=60)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
        if sinfo.stdout.strip() in ("idle", "mix", "alloc"):
            return env
        time.sleep(1)
    stop(d, env)
    raise AssertionError(f"SLURM node never became idle: sinfo said {sinfo.stdout!r} {sinfo.stderr!r}\n"
                         f"slurmctld.log:\n{tail(d / 'slurmctld.log')}\nslurmd.log:\n{tail(d / 'slurmd.log')}")


def stop(d: Path, env: dict) -> None:
    """Cancel every job, then stop slurmd and slurmctld (by their pid files; munged stays for other users).

    A slurmd told to stop while it is still killing a job's steps can stay behind: let the jobs end first (up to
    KillWait, 30 s), and make sure each daemon is gone.
    """
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
    deadline = time.time() + 45
    while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                    timeout=30).stdout.strip():
        time.sleep(1)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        stop_daemon(d / pid_file)


def stop_daemon(pid_file: Path) -> None:
    """SIGTERM the daemon whose pid `pid_file` holds (if it exists), SIGKILL it after 15 s; wait until it is gone."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().strip())
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)


@pytest.fixture(scope="session", name="slurm")
def slurm_cluster(tmp_path_factory):
    """The client environment of the session's one-node cluster (started on first use)."""
    if _RUNNING:  # another test module's instance of this fixture started it; that instance stops it
        yield _RUNNING["env"]
        return
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        reason = f"needs root and {', '.join(missing) or 'SLURM'} (bash .ci/run installs slurm-wlm + munge)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    _RUNNING["env"] = start(d)
    try:
        yield _RUNNING["env"]
    finally:
        stop(d, _RUNNING.pop("env"))


# ---------------------------------------------------------------- driving jobs


def scontrol_job(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=env, capture_output=True, text=True,
                         timeout=30)
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def queued(env: dict) -> list[str]:
    """Ids of every job SLURM still lists as pending or running."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, check=True,
                         timeout=30)
    return out.stdout.split()


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_now(env: dict, job_id: str) -> None:
    """A requeued job waits ~120 s (Reason=BeginTime) before it is eligible again; make it eligible now.

    Not in the same second as the requeue: slurmd compares credential times in whole seconds, and a new attempt
    whose credential dates from the second the previous one was revoked is killed ("Job credential revoked").
    """
    time.sleep(2)
    out = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"scontrol update JobId={job_id} StartTime=now: {out.stderr.strip()}"


def job_state(env: dict, job_id: str) -> str | None:
    return scontrol_job(env, job_id).get("JobState")
