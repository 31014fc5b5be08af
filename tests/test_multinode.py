"""`pretrain submit --nodes 2` on a real two-node SLURM cluster (tests/multinode_cluster.py): one job, ranks on both
nodes, expert parallelism across them over gloo; USR1 preemption -> requeue -> a bitwise-exact resume; a node lost
mid-run -> the surviving ranks stop, no torn checkpoint, `pretrain status` says so, the requeued job resumes.

The nodes are network + UTS + mount namespaces with private addresses on a bridge, so a rank on node 2 reaches
node 1 only as another machine would. Needs root (the cluster is skipped elsewhere, a failure in CI).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster import ENDED, job_state, scontrol_job, start_now, wait_for
from harness import run as run_cmd
from multinode_cluster import NODES, TwoNodeCluster, missing
from test_train import FAST as TRAIN_FAST

from pretrain.cluster.status import collect, read_jsonl
from pretrain.dist import gloo_address_problem
from pretrain.runs.integrity import select_tag, verify_tag

ROOT = Path(__file__).resolve().parents[1]
DEBUG = "configs/debug/pretrain.yaml"
# as tests/test_submit.py's FAST: a debug run that takes seconds per step; ckpt_every=1 makes a resume bitwise exact
FAST = [*TRAIN_FAST, "train.ckpt_every=1"]



@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The module's two-node cluster, shared by its tests (starting it takes about a second)."""
    lacking = missing()
    if lacking:
        reason = f"needs {', '.join(lacking)} (bash .ci/run installs slurm-wlm, munge and iproute2; run as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    c = TwoNodeCluster(tmp_path_factory.mktemp("slurm2n"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _env(c: TwoNodeCluster) -> dict:
    env = {k: v for k, v in c.env.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_JOB", "SLURM_PROCID"))}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _pretrain(c: TwoNodeCluster, *args: object):
    return run_cmd([sys.executable, "-m", "pretrain", *map(str, args)], timeout=300, env=_env(c))


def _submit(c: TwoNodeCluster, run: Path, shards: Path, tasks_per_node: int, *overrides: str) -> str:
    out = _pretrain(c, "submit", "train", DEBUG, f"data.root={shards}", f"output_dir={run}", *FAST, *overrides,
                    "--nodes", 2, "--gpus-per-node", 0, "--tasks-per-node", tasks_per_node, "--cpus-per-task", 1)
    assert out.returncode == 0, out.stderr
    return str(read_jsonl(run / "slurm" / "jobs.jsonl")[-1]["job_id"])


def _status(c: TwoNodeCluster, run: Path) -> dict:
    out = _pretrain(c, "status", run, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _logged_step(run: Path) -> int:
    return max((r["step"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r), default=0)


def _ended(c: TwoNodeCluster, job_id: str, timeout: float = 400) -> dict:
    wait_for(lambda: job_state(c.env, job_id) in ENDED, timeout, f"job {job_id} to end")
    return scontrol_job(c.env, job_id)


def _requeued(c: TwoNodeCluster, job_id: str, restarts: int) -> dict:
    job = scontrol_job(c.env, job_id)
    return job if job.get("Restarts") == str(restarts) and job.get("JobState") == "PENDING" else {}


def _ranks_per_node(c: TwoNodeCluster) -> dict[str, int]:
    """How many `pretrain train` processes each node's namespace holds right now."""
    def is_rank(pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return not argv[0].endswith(b"srun") and b"pretrain" in argv and b"train" in argv
    return {node: sum(map(is_rank, c.pids(node))) for node in NODES}


def test_status_names_a_lost_node(tmp_path):
    """What `pretrain status` makes of an attempt that lost a node (no cluster needed: the files such a job leaves)."""
    (tmp_path / "config.yaml").write_text("train: {max_steps: 8}\n")
    (tmp_path / "checkpoints" / "step_00000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003")
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "jobs.jsonl").write_text('{"job_id": "41"}\n')
    (tmp_path / "slurm" / "attempts.jsonl").write_text('{"job_id": 41, "attempt": 0, "rc": 9, "action": "ended"}\n')
    (tmp_path / "slurm" / "41.log").write_text(  # as slurm/train.sbatch, srun and slurmstepd write it
        "=== pretrain: job 41 attempt 0 (SLURM_RESTART_COUNT=0) on n[1-2], 2026-12-07 09:03:35 UTC ===\n"
        "pretrain train: error: another rank failed and left the job (DistBackendError: ...)\n"
        "srun: error: n1: task 0: Exited with exit code 9\nsrun: error: Node failure on n2\n"
        "slurmstepd-n1: error: *** JOB 41 ON n1 CANCELLED AT 2026-12-07T09:02:01 DUE TO NODE FAILURE, SEE SLURMCTLD "
        "LOG FOR DETAILS ***\n=== pretrain: job 41 attempt 0: the step exited 9, 2026-12-07 09:04:47 UTC ===\n")
    report = collect(tmp_path, use_slurm=False)
    assert report["state"] == "node_failed" and report["log"]["lost_nodes"] == ["n2"], report
    assert report["log"]["node_failure"] and report["detail"] == (
        "node n2 failed during job 41; the ranks on the other nodes stopped (exit 9: another rank left the job); "
        "SLURM does not answer here; unless it requeued the job, resubmit (the same `pretrain submit` command), the "
        "run resumes from checkpoint step_00000003")


def test_gloo_across_nodes_needs_a_hostname_that_is_not_the_loopback():
    """On a node whose hostname resolves to 127.0.x.x gloo would listen on the loopback: the ranks of a multi-node job
    would wait out the timeout. The run refuses at once instead (the cluster's nodes pass: pt-node1 -> 10.77.x.11)."""
    two_nodes = {"SLURM_JOB_NUM_NODES": "2"}
    assert "resolves only to the loopback (127.0.0.1)" in gloo_address_problem(two_nodes, "localhost")
    assert "GLOO_SOCKET_IFNAME" in gloo_address_problem(two_nodes, "nosuch.invalid")
    assert gloo_address_problem({**two_nodes, "GLOO_SOCKET_IFNAME": "eth0"}, "localhost") is None
    assert gloo_address_problem({"SLURM_JOB_NUM_NODES": "1"}, "localhost") is None


def _latest_verifies(run: Path) -> int:
    """The step of the checkpoint `latest` names, after checking every file of it against its manifest."""
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert select_tag(ckpt) == tag, f"resume would not pick `latest` ({tag}) in {ckpt}"
    assert verify_tag(ckpt / tag) is None, verify_tag(ckpt / tag)
    return int(tag.removeprefix("step_"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from pretrain.runs.load import load_run

    return load_run(run).model.state_dict()


def _completed(c: TwoNodeCluster, run: Path, job: str, steps: int, restarts: int, redone: int = 0) -> str:
    """Checks that the job ended with exit 0 after `restarts` requeues, its last checkpoint verifies at `steps`,
    and every step was logged once (`redone`: or twice, for steps trained after a checkpoint that was lost)."""
    final = _ended(c, job)
    log = (run / "slurm" / f"{job}.log").read_text()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), \
        log[-4000:]
    assert final["NodeList"] == "pt-node[1-2]", final
    assert _latest_verifies(run) == steps
    logged = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r]
    assert sorted(set(logged)) == list(range(1, steps + 1)) and len(logged) <= steps + redone, logged
    return log


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_shm_op")
def test_preempted_two_node_job_resumes_bitwise_equal_to_an_uninterrupted_one(cluster, shards, tmp_path):
    """One task per node, ep_size=2: each expert group spans both nodes. Two jobs side by side (each takes one CPU
    of each node): one uninterrupted, one preempted by USR1 after step 1, requeued and resumed."""
    steps = ["train.max_steps=3", "engine.ep_size=2"]
    ref, run = tmp_path / "uninterrupted", tmp_path / "preempted"
    ref_job = _submit(cluster, ref, shards, 1, *steps)
    job = _submit(cluster, run, shards, 1, *steps)
    wait_for(lambda: _logged_step(run) >= 1, 300, f"{run} to log step 1")
    assert _ranks_per_node(cluster) == {"pt-node1": 2, "pt-node2": 2}  # a rank of each job on each node
    out = run_cmd(["scancel", "--signal=USR1", "--batch", job], timeout=30, env=cluster.env)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: _requeued(cluster, job, 1), 120, f"job {job} to be requeued")
    assert _status(cluster, run)["state"] == "preempted"
    stopped_at = _latest_verifies(run)
    start_now(cluster.env, job)

    log = _completed(cluster, run, job, 3, restarts=1)
    assert "ep_size=2, world=2" in (run / "logs" / "rank0.log").read_text()
    attempts = [(a["attempt"], a["rc"], a["action"]) for a in read_jsonl(run / "slurm" / "attempts.jsonl")]
    assert attempts == [(0, 75, "requeued"), (1, 0, "ended")], log[-3000:]
    assert log.count("stopped by signal after step") == 2, log[-3000:]  # both ranks, one on each node
    assert 1 <= stopped_at < 3
    _completed(cluster, ref, ref_job, 3, restarts=0)
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    losses = [[r["loss/total"] for r in read_jsonl(d / "metrics.jsonl") if "lr" in r] for d in (run, ref)]
    assert losses[0] == losses[1]


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_shm_op")
def test_node_lost_mid_run_stops_the_job_and_the_requeued_job_resumes(cluster, shards, tmp_path):
    """Two tasks per node, ep_size=4 (experts spread over both nodes). Node 2 dies (every process in it killed,
    slurmd included) after the first checkpoint: the ranks on node 1 stop within a bounded time, `latest` still
    verifies, `pretrain status` names the lost node, and once the node is back the requeued job resumes and ends."""
    run = tmp_path / "lost"
    # engine.timeout_s bounds how long a survivor can wait in a collective for a peer that is gone silently
    job = _submit(cluster, run, shards, 2, "train.max_steps=3", "engine.ep_size=4", "engine.timeout_s=60")
    # lost as soon as the first checkpoint is committed: during step 2 or the save of step 2
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 300, f"{run} to commit a checkpoint", every=0.2)
    assert _ranks_per_node(cluster) == {"pt-node1": 2, "pt-node2": 2}
    lost_at = time.time()
    cluster.kill_node("pt-node2")
    wait_for(lambda: _ranks_per_node(cluster)["pt-node1"] == 0, 90, "the ranks on pt-node1 to stop")
    stopped_in = time.time() - lost_at
    # the connections to node 2 closed: at once (rank 0) or after errors.PEER_GRACE_S (5 s, the other ranks); a peer
    # gone silently would take engine.timeout_s (60 s here) or SLURM's node-failure kill (SlurmdTimeout + KillWait)
    assert stopped_in < 75, stopped_in
    wait_for(lambda: _requeued(cluster, job, 1), 90, f"job {job} to be requeued")
    resumed_from = _latest_verifies(run)  # the checkpoint save the loss interrupted was not committed
    assert 1 <= resumed_from <= 2
    redone = _logged_step(run) - resumed_from
    log = (run / "slurm" / f"{job}.log").read_text()
    # every rank of node 1 said a peer left (exit 9), or SLURM killed it (a node failure cancels the job's steps)
    survivors = re.findall(r"srun: error: pt-node1: tasks? [\d,-]+: (Exited with exit code \d+|Killed)", log)
    assert survivors and set(survivors) <= {"Exited with exit code 9", "Killed"}, log[-4000:]
    assert "srun: error: Node failure on pt-node2" in log, log[-4000:]
    status = _status(cluster, run)
    print(f"\nranks on node 1 stopped {stopped_in:.1f} s after node 2 was lost ({survivors}); latest = step "
          f"{resumed_from}; status: {status['state']}: {status['detail']}")
    assert status["state"] == "node_failed", status
    assert f"node pt-node2 failed during job {job}; the ranks on the other nodes stopped (exit 9" in status["detail"]
    assert f"SLURM requeued the job, it resumes from checkpoint step_{resumed_from:08d}" in status["detail"]

    cluster.start_node("pt-node2")
    cluster.wait_idle()
    start_now(cluster.env, job)
    log = _completed(cluster, run, job, 3, restarts=1, redone=redone)
    assert f"training steps {resumed_from} → 3" in (run / "logs" / "rank0.log").read_text(), log[-3000:]
    assert _status(cluster, run)["state"] == "finished"
