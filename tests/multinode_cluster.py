"""A real two-node SLURM cluster on one machine: each node a network + UTS + mount namespace of its own.

Layout (made by `start`, removed by `stop`):

    host namespace: bridge <br> 10.77.N.1/24, slurmctld (listens on every address), munged (tests/cluster.py)
    namespace <ns>1: hostname pt-node1, eth0 10.77.N.11/24 (veth to the bridge), slurmd, the jobs' processes
    namespace <ns>2: hostname pt-node2, eth0 10.77.N.12/24, slurmd, ...

The 10.77.N.x addresses exist only there: rank processes inherit their slurmd's namespaces, so a rank on node 2 sees
only node 2's address, and ranks on two nodes meet over the bridge, as on two machines. Each node's mount namespace
has its own /etc/hosts naming both nodes and the controller (what a cluster's DNS does): `MASTER_ADDR=pt-node1`
(the job script, pretrain/dist.py) resolves to 10.77.N.11 on both nodes, and gloo, which picks the address it
listens on by resolving the node's own hostname, binds 10.77.N.x rather than the loopback (on a node whose hostname
resolves to 127.0.x.x, gloo needs GLOO_SOCKET_IFNAME instead). The machine's own /etc/hosts is not touched.

munged is the machine's one (its socket is a file, reachable from every namespace). Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from cluster import _slurmd_cpus, _start_munge, stop_daemon, tail
from harness import free_port

NODES = ("pt-node1", "pt-node2")
NEEDED = ("ip", "nsenter", "unshare", "mount", "munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol",
          "scancel", "squeue")


def _sh(*cmd: str, env: dict | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


class TwoNodeCluster:
    """Names, addresses and files of one two-node cluster; `start()` brings it up, `stop()` removes all of it."""

    def __init__(self, d: Path) -> None:
        self.d = d
        tag = os.getpid() % 200 + 20  # a subnet and link names of this session's own (another may run beside it)
        self.subnet, self.bridge = f"10.77.{tag}", f"ptmnbr{tag}"
        self.netns = {node: f"ptmn{tag}-{i}" for i, node in enumerate(NODES, 1)}
        self.addr = {node: f"{self.subnet}.{10 + i}" for i, node in enumerate(NODES, 1)}
        self.conf = d / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- set-up

    def _slurm_conf(self) -> str:
        host = os.uname().nodename.split(".")[0]
        mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 8 // 10
        d, cpus = self.d, _slurmd_cpus()
        nodes = [f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory={mem_mib} State=UNKNOWN"
                 for n, a in self.addr.items()]
        return "\n".join([
            "ClusterName=pretrain-2n", f"SlurmctldHost={host}({self.subnet}.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.%n.log",
            f"SlurmctldPort={free_port()}", "SlurmdPort=6818",  # slurmd ports live in the nodes' namespaces
            # the jobs' rendezvous port is 10000 + job id on pt-node1, a namespace of its own: any id is free there
            f"FirstJobId={free_port(10001, 30000) - 10000}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            # a lost node is DOWN within ~SlurmdTimeout (pinged every third of it), its job requeued; KillWait short
            # so that a cancelled job frees its nodes at once
            "SlurmdTimeout=6", "MessageTimeout=5", "KillWait=5", "TCPTimeout=2", "MinJobAge=600",
            *nodes, f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP", "",
        ])

    def _network(self) -> None:
        self._unnetwork()  # leftovers of a session that died before its teardown
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, (node, ns) in enumerate(self.netns.items(), 1):
            veth = f"{self.bridge}v{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge)
            _sh("ip", "link", "set", veth, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _unnetwork(self) -> None:
        for ns in self.netns.values():
            _sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair, along
        _sh("ip", "link", "del", self.bridge, check=False)

    def start_node(self, node: str) -> None:
        """slurmd of `node` in its namespaces: hostname = NodeName, its own /etc/hosts, its spool directory."""
        hosts = self.d / f"hosts.{node}"
        host = os.uname().nodename.split(".")[0]
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addr.items())
                         + f"{self.subnet}.1 {host}\n")
        (self.d / "spool" / node).mkdir(parents=True, exist_ok=True)
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without /sys/fs/cgroup, and slurmd then fails
        # ("Unable to initialize cgroup plugin"). A private mount namespace keeps the bind mount inside the node.
        script = f"hostname {node} && mount --bind {hosts} /etc/hosts && exec slurmd -f {self.conf}"
        _sh("nsenter", f"--net=/var/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount", "--propagation",
            "private", "sh", "-c", script, env=self.env, timeout=60)

    def start(self) -> dict:
        """Network, munged, slurmctld and both slurmds; returns the client environment once both nodes are idle."""
        for sub in ("state", "spool"):
            (self.d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._slurm_conf())
        try:
            self._network()
            _start_munge()
            _sh("slurmctld", "-f", str(self.conf), env=self.env, timeout=60)
            for node in NODES:
                self.start_node(node)
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self.env

    def node_states(self) -> dict[str, str]:
        out = _sh("sinfo", "-h", "-N", "-o", "%N %t", env=self.env, check=False)
        return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n) in ("idle", "mix", "alloc") for n in NODES):
                return
            time.sleep(0.5)
        raise AssertionError(f"SLURM nodes never became idle: {states}\nslurmctld.log:\n"
                             f"{tail(self.d / 'slurmctld.log')}\n"
                             + "\n".join(f"slurmd.{n}.log:\n{tail(self.d / f'slurmd.{n}.log')}" for n in NODES))

    # ---------------------------------------------------------------- the nodes' processes

    def pids(self, node: str) -> list[int]:
        """Every process in `node`'s network namespace: its slurmd, slurmstepds and the jobs' processes."""
        out = _sh("ip", "netns", "pids", self.netns[node], check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_node(self, node: str) -> None:
        """The node is lost: SIGKILL to every process in it at once (its sockets close: no goodbye is sent)."""
        for _ in range(5):  # a slurmstepd may fork while we kill
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    # ---------------------------------------------------------------- teardown

    def stop(self) -> None:
        """Cancel every job, stop the daemons (each node's processes, then slurmctld), remove the namespaces."""
        _sh("scancel", "--full", "--user", "root", env=self.env, check=False)
        deadline = time.time() + 30
        while time.time() < deadline and _sh("squeue", "-h", env=self.env, check=False).stdout.strip():
            time.sleep(1)
        for node in NODES:
            self.kill_node(node)
        stop_daemon(self.d / "slurmctld.pid")
        self._unnetwork()


def missing() -> list[str]:
    """What this machine lacks for the cluster ([] when it can run it): programs, root, namespaces (a container
    without CAP_SYS_ADMIN cannot make them)."""
    lacking = [b for b in NEEDED if shutil.which(b) is None] + ([] if os.geteuid() == 0 else ["root"])
    if not lacking:
        probe = _sh("unshare", "--net", "--uts", "--mount", "true", check=False)
        if probe.returncode != 0:
            lacking.append(f"network/UTS/mount namespaces (unshare: {probe.stderr.strip()})")
    return lacking
