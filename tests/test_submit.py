"""`pretrain submit` / `pretrain status` and the job template (slurm/train.sbatch).

The first tests need no SLURM (rendering, refusals, status of half-written run dirs). The rest run real jobs on the
one-node cluster of tests/cluster.py: requeue on preemption with a bitwise-exact resume, the time limit, a crash,
the requeue cap, chaining, and status along the way. Nothing is mocked: sbatch, scontrol and the daemons are real.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster import ENDED, job_state, queued, scontrol_job, slurm_cluster, start_now, wait_for  # noqa: F401
from harness import run as run_cmd
from test_train import FAST as TRAIN_FAST

from pretrain.cluster.status import collect, format_report, read_jsonl, speed

ROOT = Path(__file__).resolve().parents[1]
DEBUG = "configs/debug/pretrain.yaml"
# a 2-rank expert-parallel debug run that takes seconds per attempt (as tests/test_train.py's FAST)
FAST = [*TRAIN_FAST, "engine.ep_size=2"]
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"]
pytestmark = pytest.mark.usefixtures("deepspeed_shm_op")  # the jobs run `pretrain train`: DeepSpeed


def _env(base: dict | None = None) -> dict:
    env = {k: v for k, v in (base or os.environ).items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_JOB", "SLURM_PROCID"))}
    # PYTHONPATH: the jobs import this checkout's package (sbatch passes the submitting environment on)
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _pretrain(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "pretrain", *map(str, args)], timeout=300, env=env or _env())


def _scancel(env: dict, *args: str) -> None:
    out = run_cmd(["scancel", *args], timeout=30, env=env)
    assert out.returncode == 0, out.stderr


def _submit(run: Path, shards, *args: str, env: dict | None = None, overrides=(), config=DEBUG):
    return _pretrain("submit", "train", config, f"data.root={shards}", f"output_dir={run}", *FAST, *overrides,
                     *CPU_JOB, *args, env=env)


def _job_ids(run: Path) -> list[str]:
    return [str(j["job_id"]) for j in read_jsonl(run / "slurm" / "jobs.jsonl")]


def _status(run: Path, env: dict) -> dict:
    out = _pretrain("status", run, "--json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


# ---------------------------------------------------------------- without SLURM


def test_dry_run_renders_a_valid_script_and_writes_nothing(tmp_path):
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}/run", "train.max_steps=7", "--nodes", "2",
                    "--gpus-per-node", "h100:4", "--time", "1-00:00:00", "--signal-grace", "240", "--partition", "gpu",
                    "--sbatch-arg", "exclusive", "--sbatch-arg", "comment=a b", "--chain", "2", "--dependency",
                    "afterok:41", "--max-requeues", "5", "--dry-run")
    assert out.returncode == 0, out.stderr
    script, _, commands = out.stdout.rpartition("\n\n")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=h100:4",
                 "#SBATCH --signal=B:USR1@240", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/run/slurm/%j.log", f"#SBATCH --chdir={ROOT}",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --partition=gpu", "#SBATCH --exclusive",
                 '#SBATCH --comment="a b"', "MAX_REQUEUES=5",
                 f"srun --wait=600 {sys.executable} -m pretrain train \"$RUN_DIR/config.yaml\" &"]:
        assert line in script.splitlines(), line
    assert "${" + "SLURM_RESTART_COUNT:-0}" in script  # the shell's own variables are left alone
    syntax = run_cmd(["bash", "-n"], timeout=30, input=script)
    assert syntax.returncode == 0, syntax.stderr
    assert commands.splitlines() == [
        f"sbatch --parsable --dependency=afterok:41 '{tmp_path}/run/slurm/<job id>.sbatch'",
        f"sbatch --parsable '--dependency=afterany:<job 1>' '{tmp_path}/run/slurm/<job id>.sbatch'"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'?"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "--tasks-per-node is for CPU-only jobs"),
    (["--time", "3", "--signal-grace", "150"], "leave no time to train within --time 3 (180 s)"),
    (["--time", "3h"], "--time '3h': expected minutes"),
    (["--gpus-per-node", "h100"], "--gpus-per-node 'h100': expected [TYPE:]COUNT"),
    (["engine.ep_size=2", "--gpus-per-node", "0", "--tasks-per-node", "3"], "does not divide the job's 3 ranks"),
    (["data.partitions=4", "tasks.cls.batch_size=8", "tasks.det.batch_size=4", "tasks.seg.batch_size=4",
      "--gpus-per-node", "0", "--tasks-per-node", "3"], "the job's 3 ranks do not divide data.partitions=4"),
    (["--sbatch-arg", "=x"], "--sbatch-arg '=x': expected KEY=VALUE"),
    (["--job-name", "x\necho INJECTED"], "--job-name 'x\\necho INJECTED': a newline or other control character"),
    (["--python", "python\necho INJECTED"], "--python 'python\\necho INJECTED': a newline"),
])
def test_bad_submissions_are_one_line_and_exit_2(tmp_path, args, message):
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}/run", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_finetune_and_templates(tmp_path):
    # a fine-tuning config validates against the fine-tuning schema; a pretraining config does not
    out = _pretrain("submit", "finetune", "configs/debug/finetune.yaml", f"output_dir={tmp_path}/ft", "--dry-run")
    assert out.returncode == 0 and "-m pretrain finetune" in out.stdout, out.stderr
    out = _pretrain("submit", "finetune", DEBUG, f"output_dir={tmp_path}", "--dry-run")
    assert out.returncode == 2 and "configs/debug/pretrain.yaml is a pretraining config" in out.stderr, out.stderr
    custom = tmp_path / "my.sbatch"
    custom.write_text("#!/bin/bash\n#SBATCH --nodes=${nodes}\n${python} -m pretrain ${subcommand} # ${gpu_type}\n")
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}", "--template", custom, "--dry-run")
    assert out.returncode == 2 and "unknown placeholder ${gpu_type}" in out.stderr, out.stderr
    custom.write_text("#!/bin/bash\n#SBATCH --nodes=${nodes}\n${python} -m pretrain ${subcommand} $HOME\n")
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}", "--template", custom, "--python", "python3",
                    "--dry-run")
    assert out.returncode == 0 and "#SBATCH --nodes=1\npython3 -m pretrain train $HOME\n" in out.stdout, out.stderr


def _fake_checkpoint(run: Path, step: int) -> None:
    tag = f"step_{step:08d}"
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag)


def test_finished_run_is_refused_unless_forced_and_no_sbatch_is_named(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}", "train.max_steps=10", "--dry-run")
    assert out.returncode == 2 and "already holds a finished run (checkpoint step_00000010" in out.stderr
    assert "--force" in out.stderr
    assert _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}", "train.max_steps=10", "--dry-run",
                     "--force").returncode == 0
    no_sbatch = {**_env(), "PATH": str(tmp_path / "empty")}
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}", "train.max_steps=11", env=no_sbatch)
    assert out.returncode == 2 and "sbatch not found on PATH" in out.stderr, out.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing written before a submission can happen


def test_train_returns_at_once_when_the_run_is_complete(tmp_path):
    """What a chained job does when the run finished before it started (no data, no engine needed)."""
    _fake_checkpoint(tmp_path, 5)
    out = _pretrain("train", DEBUG, f"output_dir={tmp_path}", f"data.root={tmp_path}/nothing", "train.max_steps=5")
    assert out.returncode == 0 and "run already complete" in out.stderr, out.stderr[-2000:]


def test_status_of_half_written_run_dirs(tmp_path):
    empty = collect(tmp_path, use_slurm=False)
    assert (empty["state"], empty["checkpoint"], empty["max_steps"]) == ("unknown", None, None)
    assert "nothing written yet" in format_report(empty)
    (tmp_path / "config.yaml").write_text("train: {max_steps: [")  # torn YAML
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")  # names a tag that is not there
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "time": 10.0, "lr": 0.1, "loss/cls": 1.5}\n{"step": 3, "ti')
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "jobs.jsonl").write_text('{"job_id": "77"}\nnot json\n[1]\n')
    (tmp_path / "slurm" / "77.log").write_bytes(  # two attempts: only the last one's error counts
        b"=== pretrain: job 77 attempt 0 (SLURM_RESTART_COUNT=0) on vm\nValueError: old\n"
        b"=== pretrain: job 77 attempt 0: the step exited 75\n=== pretrain: job 77 attempt 1 (SLURM_RESTART_COUNT=1)"
        b"\n\xff\xfe\nKeyError: 'x'\nsrun: error: vm: task 0: Exited with exit code 1\n"
        b"=== pretrain: job 77 attempt 1: the step exited 1, 2026-12-04 18:14:14 UTC ===\n")
    report = collect(tmp_path, use_slurm=False)
    assert report["checkpoint"] is None and report["max_steps"] is None
    assert report["metrics"] == {"loss/cls": {"value": 1.5, "step": 2}}
    assert (report["state"], report["detail"]) == ("failed", "KeyError: 'x'")
    assert "job 77" in format_report(report)
    out = _pretrain("status", tmp_path, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "failed", out.stderr


def test_status_speed_eta_and_verdicts(tmp_path):
    records = [{"step": 10, "time": 100.0, "lr": 1.0}, {"step": 10, "time": 100.5, "eval/cls/top1": 0.5},
               {"step": 20, "time": 105.0, "lr": 1.0}]
    assert speed(records, 100) == {"last_step": 20, "steps_per_s": 2.0, "eta_s": 40.0}
    (tmp_path / "config.yaml").write_text("train: {max_steps: 30}\n")
    (tmp_path / "slurm").mkdir()
    attempts = tmp_path / "slurm" / "attempts.jsonl"
    for line, state in [({"rc": 75, "action": "requeued"}, "preempted"),
                        ({"rc": 138, "action": "requeued"}, "preempted"),
                        ({"rc": 75, "action": "not requeued"}, "preempted"),
                        ({"rc": 75, "action": "not requeued: JobState=COMPLETING"}, "stopped"),
                        ({"rc": 3, "action": "ended"}, "aborted"), ({"rc": 1, "action": "ended"}, "failed"),
                        ({"rc": 0, "action": "ended"}, "stopped")]:
        attempts.write_text(json.dumps({"job_id": 5, "attempt": 0, **line}) + "\n")
        assert collect(tmp_path, use_slurm=False)["state"] == state, line
    _fake_checkpoint(tmp_path, 30)
    assert collect(tmp_path, use_slurm=False)["state"] == "finished"


def test_status_of_a_run_without_slurm_reads_its_rank_log(tmp_path):
    """A run started by hand (torchrun): the verdict comes from logs/rank0.log, its last run only."""
    (tmp_path / "logs").mkdir()
    first = "x: params {}; training steps 0 → 8\nx: aborting: 3 consecutive non-finite steps\n"
    (tmp_path / "logs" / "rank0.log").write_text(first)
    assert collect(tmp_path)["state"] == "aborted"
    again = first + "x: params {}; training steps 4 → 8\nx: stopped by signal after step 6; exit 75\n"
    (tmp_path / "logs" / "rank0.log").write_text(again)
    assert collect(tmp_path)["state"] == "preempted"


# ---------------------------------------------------------------- on the one-node cluster


def _logged_step(run: Path) -> int:
    return max((r["step"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r), default=0)


def _ended(env: dict, job_id: str, timeout: float = 300) -> dict:
    wait_for(lambda: job_state(env, job_id) in ENDED, timeout, f"job {job_id} to end")
    return scontrol_job(env, job_id)


def _requeued(env: dict, job_id: str, restarts: int) -> dict:
    job = scontrol_job(env, job_id)
    return job if job.get("Restarts") == str(restarts) and job.get("JobState") == "PENDING" else {}


def _preempt(env: dict, run: Path, job_id: str, after_step: int, restarts: int) -> None:
    """USR1 to the batch shell once the run has logged `after_step`; wait for the requeue and skip its hold."""
    wait_for(lambda: _logged_step(run) >= after_step, 300, f"{run} to log step {after_step}")
    _scancel(env, "--signal=USR1", "--batch", job_id)
    wait_for(lambda: _requeued(env, job_id, restarts), 120, f"job {job_id} to be requeued ({restarts})")
    if restarts == 1:
        assert _status(run, env)["state"] == "preempted"
    start_now(env, job_id)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from pretrain.runs.load import load_run

    return load_run(run).model.state_dict()


@pytest.mark.slow
def test_preempted_twice_requeues_and_ends_bitwise_equal_to_an_uninterrupted_chain(slurm, shards, tmp_path):
    # ckpt_every=1: the data stream restarts from (seed, step) at every checkpoint, so a resume is bitwise exact
    # only if the uninterrupted run also restarted its stream at the step the signal landed on
    env, steps = _env(slurm), ["train.max_steps=10", "train.ckpt_every=1"]
    run, config = tmp_path / "preempted", tmp_path / "mine.yaml"
    shutil.copy(ROOT / DEBUG, config)
    out = _submit(run, shards, "--time", "20", env=env, overrides=steps, config=config)
    assert out.returncode == 0 and "submitted job" in out.stdout and "pretrain status" in out.stdout, out.stderr
    config.write_text("train: {max_steps: 2}\n")  # the job runs from output_dir/config.yaml, frozen at submission
    (job,) = _job_ids(run)
    assert (run / "slurm" / f"{job}.sbatch").is_file() and (run / "config.yaml").is_file()
    wait_for(lambda: _logged_step(run) >= 1, 300, "the first logged step")
    assert _status(run, env)["state"] == "running"
    _preempt(env, run, job, after_step=2, restarts=1)
    first_stop = _logged_step(run)
    _preempt(env, run, job, after_step=first_stop + 1, restarts=2)
    final = _ended(env, job)
    log = (run / "slurm" / f"{job}.log").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", log[-3000:]
    attempts = [(a["attempt"], a["rc"], a["action"]) for a in read_jsonl(run / "slurm" / "attempts.jsonl")]
    assert attempts == [(0, 75, "requeued"), (1, 75, "requeued"), (2, 0, "ended")], log[-3000:]
    for attempt in range(3):
        assert f"=== pretrain: job {job} attempt {attempt} (SLURM_RESTART_COUNT={attempt})" in log
    assert log.count("stopped by signal after step") == 4  # two ranks, twice
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11))  # none lost, none twice
    status = _status(run, env)
    assert status["state"] == "finished" and status["checkpoint"]["tag"] == "step_00000010"
    from pretrain.runs.checkpoint import read_latest

    assert status["checkpoint"]["tag"] == read_latest(run / "checkpoints")  # status reads `latest` as resume does

    # the same run without interruptions, as a chain of two jobs: the second finds it complete and exits at once
    ref = tmp_path / "uninterrupted"
    out = _submit(ref, shards, "--chain", "2", env=env, overrides=steps)
    assert out.returncode == 0, out.stderr
    first, second = _job_ids(ref)
    assert scontrol_job(env, second)["Dependency"] == f"afterany:{first}(unfulfilled)"
    assert _ended(env, first)["JobState"] == "COMPLETED"
    assert _ended(env, second)["JobState"] == "COMPLETED"
    assert "run already complete" in (ref / "slurm" / f"{second}.log").read_text()
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    losses = [[r["loss/total"] for r in read_jsonl(d / "metrics.jsonl")] for d in (run, ref)]
    assert losses[0] == losses[1]


def test_rejections_queue_nothing_and_a_crash_is_not_requeued(slurm, shards, tmp_path):
    env, run = _env(slurm), tmp_path / "crash"
    before = queued(env)
    out = _submit(run, shards, env=env, overrides=["train.max_stepz=3"])
    assert out.returncode == 2 and "unknown config key 'train.max_stepz'" in out.stderr
    out = _submit(run, shards, "--partition", "nosuch", env=env)
    assert out.returncode == 2 and "sbatch refused the job: sbatch: error: invalid partition" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert queued(env) == before and not (run / "slurm" / "jobs.jsonl").exists()
    assert not list((run / "slurm").glob(".submit-*"))
    # config validation does not look for shards: a wrong data.root is found on the node, and that is no preemption
    out = _submit(run, tmp_path / "nowhere", "--sbatch-arg", "comment=two words", env=env)
    assert out.returncode == 0, out.stderr
    (job,) = _job_ids(run)
    shown = run_cmd(["scontrol", "-o", "show", "job", job], timeout=30, env=env).stdout
    assert "Comment=two words " in shown  # a quoted `#SBATCH` value stays whole
    final = _ended(env, job)
    log = (run / "slurm" / f"{job}.log").read_text()
    assert final["JobState"] == "FAILED" and final["Restarts"] == "0" and final["ExitCode"] == "2:0", log[-3000:]
    assert "pretrain train: error:" in log and "nowhere/imagenet/train" in log, log[-3000:]
    assert [(a["rc"], a["action"]) for a in read_jsonl(run / "slurm" / "attempts.jsonl")] == [(2, "ended")]
    status = _status(run, env)
    assert status["state"] == "failed" and "nowhere/imagenet/train" in status["detail"], status


def test_requeue_cap_and_a_signal_during_startup(slurm, shards, tmp_path):
    """USR1 while the ranks are still starting is a stop request (the CLI installs the handler before the heavy
    imports): they checkpoint after their first step and exit 75, a preemption; --max-requeues 0 stops the requeue."""
    env, run = _env(slurm), tmp_path / "capped"
    out = _submit(run, shards, "--max-requeues", "0", env=env)
    assert out.returncode == 0, out.stderr
    (job,) = _job_ids(run)
    log = run / "slurm" / f"{job}.log"
    # the rank log appears when `pretrain train` starts building, long before its first step
    wait_for(lambda: (run / "logs" / "rank0.log").is_file(), 180, "the ranks to start", every=0.1)
    _scancel(env, "--signal=USR1", "--batch", job)
    final = _ended(env, job)
    text = log.read_text()
    assert final["JobState"] == "FAILED" and final["Restarts"] == "0", text[-3000:]
    assert "NOT requeued: 0 requeues reached --max-requeues=0" in text, text[-3000:]
    assert [(a["rc"], a["action"]) for a in read_jsonl(run / "slurm" / "attempts.jsonl")] == [(75, "not requeued")]
    assert _status(run, env)["state"] == "preempted"


def test_an_add_task_job_grows_the_model_and_a_drifting_resubmission_is_refused(slurm, shards, tmp_path):
    """`pretrain submit add-task MODEL CONFIG` runs `pretrain add-task MODEL <run>/config.yaml` as a job; once it has
    a checkpoint, a resubmission that its run would refuse to resume with is refused before anything is written."""
    from test_add_task import SEG2, add_task_config
    from test_extract import native_run

    env, model, run = _env(slurm), tmp_path / "trained", tmp_path / "grown"
    native_run(model, shards, "tasks.det.num_classes=0")  # a tiny trained model: a run dir with a checkpoint
    config = add_task_config(tmp_path / "add.yaml", shards, run, SEG2)
    job_opts = ["--gpus-per-node", "0", "--cpus-per-task", "1"]
    out = _pretrain("submit", "add-task", model, config, "train.max_steps=2", *job_opts, env=env)
    assert out.returncode == 0 and "submitted job" in out.stdout, out.stderr
    (job,) = _job_ids(run)
    assert f"-m pretrain add-task {model} \"$RUN_DIR/config.yaml\" &" in (run / "slurm" / f"{job}.sbatch").read_text()
    final = _ended(env, job)
    log = (run / "slurm" / f"{job}.log").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "0", log[-3000:]
    assert (run / "model.safetensors").is_file(), log[-3000:]
    assert [(a["rc"], a["action"]) for a in read_jsonl(run / "slurm" / "attempts.jsonl")] == [(0, "ended")]
    status = _status(run, env)
    assert status["state"] == "finished" and status["checkpoint"]["tag"] == "step_00000002", status
    saved, before = (run / "config.yaml").read_bytes(), queued(env)
    out = _pretrain("submit", "add-task", model, config, "train.max_steps=4", "optim.lr=0.5", *job_opts, env=env)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "trained with a different config and resuming would not be exact (optim.lr: 0.01 -> 0.5)" in out.stderr
    assert queued(env) == before and _job_ids(run) == [job] and (run / "config.yaml").read_bytes() == saved


@pytest.mark.slow
def test_time_limit_checkpoints_and_requeues(slurm, shards, tmp_path):
    """No scancel: SLURM itself sends USR1 90 s (up to 60 s more) before a 4-minute limit."""
    env, run = _env(slurm), tmp_path / "timed"
    out = _submit(run, shards, "--time", "4", "--signal-grace", "90", env=env,
                  overrides=["train.max_steps=100000", "train.ckpt_every=1000"])
    assert out.returncode == 0, out.stderr
    (job,) = _job_ids(run)
    wait_for(lambda: _requeued(env, job, 1), 300, f"job {job} to requeue itself before its time limit")
    log = (run / "slurm" / f"{job}.log").read_text()
    assert "batch shell got SIGUSR1" in log and "stopped by signal after step" in log, log[-3000:]
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 0 < step < 1000  # the signal's checkpoint, not a periodic one
    assert [(a["rc"], a["action"]) for a in read_jsonl(run / "slurm" / "attempts.jsonl")] == [(75, "requeued")]
    _scancel(env, job)
    assert _ended(env, job)["JobState"] == "CANCELLED"


def test_job_script_fails_fast_when_the_master_host_does_not_resolve(slurm, tmp_path):
    """The rendered script itself, run by bash with an allocation whose first host does not exist."""
    out = _pretrain("submit", "train", DEBUG, f"output_dir={tmp_path}", "--gpus-per-node", "0", "--dry-run")
    script = tmp_path / "job.sh"
    script.write_text(out.stdout.rpartition("\n\n")[0])
    (tmp_path / "slurm").mkdir()
    env = {**_env(slurm), "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "nosuch-x[01-02]"}
    job = run_cmd(["bash", str(script)], timeout=60, env=env)
    assert job.returncode == 1 and "cannot resolve MASTER_ADDR='nosuch-x01'" in job.stderr, job.stderr
    assert "srun" not in job.stdout + job.stderr
    assert [(a["rc"], a["action"]) for a in read_jsonl(tmp_path / "slurm" / "attempts.jsonl")] == [(1, "ended")]
