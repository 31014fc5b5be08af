"""`pretrain train` under a real SLURM: a one-node cluster (Debian's slurm-wlm + munge) started by the test.

`.ci/run` installs the packages; the daemons need root. Elsewhere the test is skipped, in CI it must run.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import free_port, retry_port_clash, run

from pretrain.log import read_metrics

NEEDED = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "srun", "sinfo")


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
        # (every test cluster starting at job 1 made two concurrent runs of this test both use port 10001)
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


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"(no {path})"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        reason = f"needs root and {', '.join(missing) or 'SLURM'} (bash .ci/run installs slurm-wlm + munge)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _start_munge()
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=60)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=60)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            if sinfo.stdout.strip() in ("idle", "mix", "alloc"):
                break
            time.sleep(1)
        else:
            raise AssertionError(
                f"SLURM node never became idle: sinfo said {sinfo.stdout!r} {sinfo.stderr!r}\n"
                f"slurmctld.log:\n{_tail(d / 'slurmctld.log')}\nslurmd.log:\n{_tail(d / 'slurmd.log')}")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            pid = d / pid_file
            if pid.is_file():
                subprocess.run(["kill", pid.read_text().strip()], capture_output=True)


def test_srun_two_ranks_expert_parallel(slurm, shards, tmp_path):
    """`srun -n 2` with only SLURM's variables: ranks, master host and port come from SLURM (pretrain/dist.py)."""
    env = {k: v for k, v in slurm.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_JOB", "SLURM_PROCID"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--kill-on-bad-exit=1", "--time", "10",
           sys.executable, "-m", "pretrain", "train", "configs/debug/pretrain.yaml", f"data.root={shards}",
           f"output_dir={tmp_path}", "data.num_workers=0", "tasks.cls.img_size=32", "tasks.cls.batch_size=8",
           "tasks.det.img_size=64", "tasks.det.batch_size=2", "model.det_min_size=64", "model.det_max_size=64",
           "tasks.seg.img_size=32", "tasks.seg.batch_size=4", "logging.wandb=disabled", "logging.plots=false",
           "engine.ep_size=2", "train.max_steps=3", "train.ckpt_every=3", "train.log_every=1"]
    # own process group: a timeout kills srun and everything it started; the next job id is the next port
    out = retry_port_clash(lambda: run(cmd, timeout=1200, env=env))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "world=2" in out.stderr and "ep_size=2" in out.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
