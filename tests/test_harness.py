"""The test harness: a timed-out child takes its whole process group with it; a failed 2-rank launch shows each
rank's output; summaries parse; the timeout scale is read and checked; no test starts a process around it."""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import communicate, free_port, popen, rank_output, retry_port_clash, run, run_ranks, summary, timeout_scale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a killed child of a dead parent may linger as a zombie until reaped
        return f.read().split(")")[1].split()[0] != "Z"


def test_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_TEST_TIMEOUT_SCALE", "1")  # the scale is read here, in the test process
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    with pytest.raises(AssertionError, match="timed out after 2 s"):
        run([sys.executable, "-c", code], timeout=2)
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild outlived the timeout"


def test_nonzero_exit_is_returned_not_raised():
    proc = run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "out\n")


def test_input_and_a_removed_variable():
    code = "import os, sys; print(sys.stdin.read(), os.environ.get('OMP_NUM_THREADS'), os.environ['DS_ACCELERATOR'])"
    proc = run([sys.executable, "-c", code], timeout=60, input="typed", env={"OMP_NUM_THREADS": None})
    assert proc.stdout.split() == ["typed", "None", "cpu"]


@pytest.mark.slow  # 1 s of waiting
def test_communicate_on_a_popen_child_times_out_and_kills_its_group(monkeypatch):
    monkeypatch.setenv("PRETRAIN_TEST_TIMEOUT_SCALE", "1")
    proc = popen([sys.executable, "-c", "import time; time.sleep(300)"], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    with pytest.raises(AssertionError, match="timed out after 1 s"):
        communicate(proc, timeout=1)
    assert proc.wait(timeout=10) == -9


@pytest.mark.parametrize("raw, scale", [(None, 1.0), ("2.5", 2.5)])
def test_timeout_scale(monkeypatch, raw, scale):
    if raw is None:
        monkeypatch.delenv("PRETRAIN_TEST_TIMEOUT_SCALE", raising=False)
    else:
        monkeypatch.setenv("PRETRAIN_TEST_TIMEOUT_SCALE", raw)
    assert timeout_scale() == scale


@pytest.mark.parametrize("raw", ["fast", "0", "-1"])
def test_bad_timeout_scale_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("PRETRAIN_TEST_TIMEOUT_SCALE", raw)
    with pytest.raises(ValueError, match="PRETRAIN_TEST_TIMEOUT_SCALE"):
        timeout_scale()


def test_free_port_in_a_range_and_retry_on_a_clash():
    assert 20000 <= free_port(20000, 20100) < 20100 and free_port() > 0
    calls = []

    def launch():
        calls.append(1)
        rc, err = (1, "DistNetworkError: ... EADDRINUSE ...") if len(calls) == 1 else (0, "")
        return subprocess.CompletedProcess([], rc, "", err)

    assert retry_port_clash(launch).returncode == 0 and len(calls) == 2
    calls.clear()
    other = subprocess.CompletedProcess([], 1, "", "some other failure")
    assert retry_port_clash(lambda: calls.append(1) or other) is other and len(calls) == 1


def test_summary_and_rank_output():
    text = "[default0]:x\n[default1]:SUMMARY {\"a\": 2}\n[default0]:SUMMARY {\"a\": 1}\nlauncher line\n"
    assert rank_output(text, 0) == "x\nSUMMARY {\"a\": 1}"
    assert summary(text) == {"a": 1} and summary(text, rank=1) == {"a": 2}
    assert summary("SUMMARY {\"b\": 3}\n", rank=None) == {"b": 3}
    # torchrun's tailer read the line before its newline: the newline came back as its own prefixed line
    assert summary("[default0]:SUMMARY {\"c\": 4}[default0]:\n") == {"c": 4}
    with pytest.raises(AssertionError, match="no 'SUMMARY ' line"):
        summary("[default0]:EP PARITY OK\n")


def test_failed_launch_shows_every_rank(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nrank = os.environ['RANK']\n"
                      "print(f'rank {rank} port', os.environ['MASTER_PORT'])\n"
                      "sys.exit(f'rank {rank} says: max abs diff 0.5') if rank == '1' else None\n"
                      "import time; time.sleep(120)\n")
    with pytest.raises(AssertionError) as err:
        run_ranks(script, timeout=120)
    msg = str(err.value)
    assert "--- rank 0 ---\nrank 0 port" in msg and "--- rank 1 ---\nrank 1 port" in msg
    assert "rank 1 says: max abs diff 0.5" in msg  # rank 1's reason; torchrun stopped the sleeping rank 0


def test_marker_tables_name_existing_tests():
    """A renamed or deleted test must leave tests/conftest.py's SLOW and DEEPSPEED_CHILDREN with it."""
    import conftest

    root = conftest.ROOT
    for entry in conftest.SLOW | conftest.DEEPSPEED_CHILDREN:
        module, _, name = entry.partition("::")
        name = name.split("[")[0]
        assert (root / module).is_file(), entry
        assert not name or f"def {name}(" in (root / module).read_text(), entry


class _Item:
    """The part of a pytest item that conftest's collection hook touches."""

    def __init__(self, nodeid: str, *marks: pytest.MarkDecorator) -> None:
        self.nodeid, self.marks, self.fixturenames = nodeid, [m.mark for m in marks], ["tmp_path"]

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.marks.append(marker.mark)

    def get_closest_marker(self, name: str):
        return next((m for m in self.marks if m.name == name), None)


@pytest.mark.parametrize("cuda", [False, True])
def test_collection_hook_marks_slow_gpu_and_deepspeed_children(monkeypatch, cuda):
    import conftest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    items = {name: _Item(name, *marks) for name, marks in [
        ("tests/test_train.py::test_smoke_run_learns_and_writes_run_dir", ()),
        ("tests/test_vit.py::test_sizes_match_timm_and_moe_counts[vit_l16]", ()),
        ("tests/test_vit.py::test_sizes_match_timm_and_moe_counts[vit_s16]", ()),
        ("tests/test_engine.py::test_ep2_matches_ep1_through_deepspeed_zero012[x]", ()),
        ("tests/test_moe.py::test_x", (pytest.mark.slow,)),
        ("tests/test_moe.py::test_on_gpu", (pytest.mark.gpu,)),
    ]}
    conftest.pytest_collection_modifyitems(None, list(items.values()))
    slow = {n for n, item in items.items() if item.get_closest_marker("slow")}
    assert slow == set(list(items)[:1] + list(items)[1:2] + list(items)[3:5])
    children = {n for n, item in items.items() if item.fixturenames[0] == "deepspeed_shm_op"}
    assert children == {list(items)[0], list(items)[3]}
    skipped = {n for n, item in items.items() if item.get_closest_marker("skip")}
    assert skipped == (set() if cuda else {"tests/test_moe.py::test_on_gpu"})


# Calls that start a process. Under tests/ they go through harness.run / run_ranks / popen: own process group, timeout
# scaled by PRETRAIN_TEST_TIMEOUT_SCALE, the whole group killed afterwards (README "Tests").
SPAWNERS = {
    "subprocess": {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"},
    "os": {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnl", "spawnle", "spawnlp",
           "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle", "execlp", "execlpe", "execv",
           "execve", "execvp", "execvpe"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
}
# Files allowed to start processes themselves, and why.
BYPASS_ALLOWED = {
    "tests/harness.py": "the helpers themselves",
    "tests/cluster.py": "starts the SLURM daemons, which must outlive the call (killing the launcher's group would "
                        "race their setsid), and polls them with short client commands",
    "tests/multinode_cluster.py": "as tests/cluster.py, for the two-node cluster: the daemons in their namespaces, "
                                  "`ip` for the namespaces and links",
}
# Files that still bypass the harness, to be routed through it (strict: the test fails once one is fixed, so the
# entry gets removed).
BYPASS_KNOWN: dict[str, str] = {}


def bare_process_calls(source: str) -> list[str]:
    """`module.name(...)` calls and `from module import name` of SPAWNERS in `source`, as 'line: text'."""
    tree = ast.parse(source)
    aliases = {}  # local name -> module, for `import subprocess as sp`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({(a.asname or a.name): a.name for a in node.names if a.name in SPAWNERS})
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in SPAWNERS:
            names = [a.name for a in node.names if a.name in SPAWNERS[node.module]]
            found += [f"{node.lineno}: from {node.module} import {n}" for n in names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.attr in SPAWNERS.get(
                    aliases.get(node.func.value.id, ""), ()):
            found.append(f"{node.lineno}: {node.func.value.id}.{node.func.attr}(")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def test_the_bypass_scan_finds_what_it_should():
    source = ("import subprocess as sp\nimport os\nfrom subprocess import PIPE, check_output\n"
              "sp.run(['x'])\nos.system('x')\nsubprocess_like = sp.CompletedProcess([], 0)\nos.killpg(1, 9)\n")
    assert bare_process_calls(source) == ["3: from subprocess import check_output", "4: sp.run(", "5: os.system("]


def test_no_test_starts_a_process_outside_the_harness():
    root = Path(__file__).resolve().parents[1]
    found = {}
    for path in sorted((root / "tests").rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name not in BYPASS_ALLOWED and (calls := bare_process_calls(path.read_text())):
            found[name] = calls
    unexpected = {k: v for k, v in found.items() if k not in BYPASS_KNOWN}
    assert not unexpected, f"start processes with harness.run / run_ranks / popen instead: {unexpected}"
    fixed = set(BYPASS_KNOWN) - set(found)
    assert not fixed, f"{sorted(fixed)} no longer bypass the harness: remove them from BYPASS_KNOWN"
