"""The rank resolver: torchrun, SLURM and single-process environments."""

import pytest

from pretrain.dist import export, first_host, resolve, slurm_port


def test_single_process():
    info = resolve({})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    info = resolve(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 1, "node7", 1234)
    assert info.launcher == "torchrun"


def test_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[003-004,010]"}
    info = resolve(env)
    assert (info.rank, info.world_size, info.local_rank) == (5, 8, 1)
    assert info.master_addr == "gpu003"
    assert info.master_port == slurm_port(123456) == 10000 + 123456 % 20000
    assert info.launcher == "slurm"


def test_torchrun_wins_over_slurm():
    # under `srun torchrun`, SLURM_PROCID is the node index; torchrun's RANK is the real rank
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    info = resolve(env)
    assert (info.rank, info.world_size, info.launcher) == (9, 16, "torchrun")


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("gpu[07-09]", "gpu07"), ("a[1,3],b2", "a1"),
                                            ("node-[100-101]", "node-100")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_environment_names_variable():
    with pytest.raises(ValueError, match="RANK"):
        resolve({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 is outside world size 2"):
        resolve({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="master host"):
        resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_export_single_process_picks_a_free_port():
    a, b = {}, {}
    export(resolve({}), a)
    export(resolve({}), b)
    assert a["RANK"] == "0" and a["WORLD_SIZE"] == "1" and int(a["MASTER_PORT"]) > 0
    kept = {"MASTER_PORT": "12345"}
    export(resolve(kept), kept)
    assert kept["MASTER_PORT"] == "12345"  # a port the user set is kept


def test_launch_failures_have_their_exit_codes():
    """A rank that never joined (exit 9, the peers' side of a failure) and a node address gloo cannot use (exit 7)
    are one line each, not internal errors."""
    from pretrain.dist import NodeAddressError, RendezvousError
    from pretrain.errors import EXIT_PEER, EXIT_SETUP, describe

    assert describe(RendezvousError("a rank did not join"), "train") == (EXIT_PEER,
                                                                         "pretrain train: error: a rank did not join")
    assert describe(NodeAddressError("loopback"), "train") == (EXIT_SETUP, "pretrain train: error: loopback")
