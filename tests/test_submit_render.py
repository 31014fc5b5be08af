"""`pretrain submit`'s job-script renderer without SLURM: every value is quoted for where it goes (`#SBATCH` lines
as sbatch reads them, shell lines as bash does), and what cannot be rendered safely is refused with one line naming
the option (the CLI's exit 2 is in tests/test_submit.py)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest


def _directives(script: str) -> list[list[str]]:
    """The words of each `#SBATCH` line as sbatch reads them (Slurm's `_opt_batch_script` + `_get_argument`): split
    at whitespace, '...'/"..." quotes, backslash escapes, an unquoted `#` ends the line; the first line that is
    neither blank nor a comment ends the directives."""
    found = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        words, word, quote, chars = [], "", None, iter(line[len("#SBATCH"):] + " ")
        for c in chars:
            if c == "\\":
                word += next(chars)
            elif quote:
                quote, word = (None, word) if c == quote else (quote, word + c)
            elif c in "\"'":
                quote = c
            elif c == "#" or c.isspace():
                words, word = words + [word] * bool(word), ""
                if c == "#":
                    break
            else:
                word += c
        assert quote is None, f"unmatched quote: {line!r}"
        found.append(words)
    return found


def _render(tmp_path: Path, monkeypatch, run: str, **opts) -> str:
    from pretrain.cluster.render import TEMPLATE, JobOptions, render

    monkeypatch.delenv("PRETRAIN_PYTHON", raising=False)
    return render(TEMPLATE.read_text(), subcommand="train", run_dir=tmp_path / run, cpus_per_task=2,
                  opts=JobOptions(gpus_per_node="0", **opts))


def test_render_quotes_every_value_for_sbatch_and_bash(tmp_path, monkeypatch):
    run = tmp_path / "my run %x #1"
    script = _render(tmp_path, monkeypatch, run.name, python="env A='x y' python3 ; rm", partition="gpu",
                     sbatch_args=["comment=it's \"a\" b#c \\d"])
    directives = _directives(script)
    assert all(len(words) == 1 for words in directives), directives  # one option per line, nothing left over
    assert len(directives) == script.count("\n#SBATCH")  # no directive after the first command: none dropped
    options = [words[0] for words in directives]
    for option in [f"--job-name=train-{run.name}", f"--output={tmp_path}/my run %%x #1/slurm/%j.log",
                   "--signal=B:USR1@300", "--requeue", f"--chdir={os.getcwd()}", "--partition=gpu",
                   "--comment=it's \"a\" b#c \\d"]:
        assert option in options, (option, options)
    lines = script.splitlines()
    assert shlex.split(next(line for line in lines if line.startswith("RUN_DIR="))) == [f"RUN_DIR={run}"]
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    assert srun[:9] == ["srun", "--wait=600", "env", "A=x y", "python3", ";", "rm", "-m", "pretrain"]
    named = _directives(_render(tmp_path, monkeypatch, "run", job_name="a b # c"))
    assert ["--job-name=a b # c"] in named


@pytest.mark.parametrize("run, opts, message", [
    ("run", {"job_name": "x\necho INJECTED"}, "--job-name 'x\\necho INJECTED': a newline or other control"),
    ("run", {"python": "python\necho INJECTED"}, "--python 'python\\necho INJECTED': a newline"),
    ("a\nb", {}, "output_dir "),
    ("run", {"partition": "gpu\r"}, "--partition 'gpu\\r'"),
    ("run", {"sbatch_args": ["comment=a\tb"]}, "--comment 'a\\tb'"),
    ("run", {"job_name": "my-HetJob"}, "--job-name 'my-HetJob': sbatch reads 'hetjob'/'packjob'"),
    ("a\\b", {}, "a backslash in the path turns off sbatch's %j"),
    ("run", {"python": "python 'x"}, "--python \"python 'x\": not a command line"),
])
def test_render_refuses_what_cannot_be_rendered_safely(tmp_path, monkeypatch, run, opts, message):
    from pretrain.cluster.render import SubmitError

    with pytest.raises(SubmitError) as caught:
        _render(tmp_path, monkeypatch, run, **opts)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_status_of_a_folder_that_is_no_run_is_exit_2(tmp_path, capsys):
    from pretrain.cli import main as cli_main

    assert cli_main(["status", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("train: {max_steps: 3}\n")  # a submitted run before its first job
    assert cli_main(["status", str(tmp_path)]) == 0


# ---- add-task jobs and resubmissions (no SLURM: dry runs, or `prepare`, which writes nothing) ----------------------

ROOT = Path(__file__).resolve().parents[1]
DEBUG, FINETUNE, ADD_TASK = (str(ROOT / "configs" / "debug" / f"{name}.yaml")
                             for name in ("pretrain", "finetune", "add_task"))


def _fake_checkpoint(run: Path, step: int) -> None:
    """What `has_checkpoint` and `latest_checkpoint` look for; no weights (nothing here loads them)."""
    tag = f"step_{step:08d}"
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag)


def _fake_pretraining_run(run: Path) -> Path:
    from pretrain.config.load import load_config, save_resolved

    save_resolved(load_config(DEBUG, [f"output_dir={run}"]), run)
    _fake_checkpoint(run, 7)
    return run


def _srun_words(cli, *argv: str) -> list[str]:
    code, out, err = cli(*argv)
    assert code == 0, err
    return shlex.split(next(line for line in out.splitlines() if line.startswith("srun ")))


@pytest.fixture()
def submit_cli(capsys, monkeypatch):
    """`pretrain ARGV` in this process: (exit code, stdout, stderr)."""
    from pretrain.cli import main as cli_main

    monkeypatch.delenv("PRETRAIN_PYTHON", raising=False)

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_an_add_task_job_runs_the_frozen_absolute_model_before_its_config(tmp_path, monkeypatch, submit_cli):
    _fake_pretraining_run(tmp_path / "my run")
    monkeypatch.chdir(tmp_path)  # MODEL relative to where `submit` runs; the job gets it absolute
    job = ["--gpus-per-node", "0", "--dry-run"]
    out = f"output_dir={tmp_path}/out"
    expected = ["-m", "pretrain", "add-task", str(tmp_path / "my run"), "$RUN_DIR/config.yaml", "&"]
    # spelled as `pretrain add-task MODEL CONFIG`, and as CONFIG add_task.model=MODEL: the same job
    assert _srun_words(submit_cli, "submit", "add-task", "my run", ADD_TASK, out, *job)[-6:] == expected
    assert _srun_words(submit_cli, "submit", "add-task", ADD_TASK, "add_task.model=my run", out, *job)[-6:] == expected
    assert _srun_words(submit_cli, "submit", "train", DEBUG, out, *job)[-3:] == ["train", "$RUN_DIR/config.yaml", "&"]
    code, script, _ = submit_cli("submit", "add-task", "my run", ADD_TASK, out, *job)
    assert "#SBATCH --job-name=add-task-out" in script.splitlines() and not (tmp_path / "out").exists()

    from pretrain.cluster.render import JobOptions
    from pretrain.cluster.submit import prepare

    cfg, _, _ = prepare("add-task", ADD_TASK, [out, "add_task.model=my run"], JobOptions(gpus_per_node="0"))
    assert cfg.add_task.model == str(tmp_path / "my run")  # what output_dir/config.yaml will hold


@pytest.mark.parametrize("model, message", [
    (None, "add_task.model: name the trained model (pretrain submit add-task MODEL CONFIG)"),
    ("nosuch", "MODEL nosuch: no such run directory or model file"),
    (".", "MODEL .: not a pretraining run directory with a checkpoint"),
    ("ft", "MODEL ft: not a pretraining run directory with a checkpoint"),  # a fine-tuning run
    ("x.safetensors", "x.safetensors: not a safetensors file"),
])
def test_an_unusable_add_task_model_is_one_line_and_queues_nothing(tmp_path, monkeypatch, submit_cli, model, message):
    monkeypatch.chdir(tmp_path)
    _fake_checkpoint(tmp_path / "ft", 3)
    (tmp_path / "ft" / "config.yaml").write_text("finetune: {decoder: mlore}\n")  # what makes it a fine-tuning run
    (tmp_path / "x.safetensors").write_text("not a model")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch either: the MODEL is what is refused
    code, _, err = submit_cli("submit", "add-task", *([model] if model else []), ADD_TASK, f"output_dir={tmp_path}/o")
    assert code == 2 and message in err and "nothing submitted" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_template_without_the_arguments_placeholder_cannot_run_add_task(tmp_path, monkeypatch):
    from pretrain.cluster.render import JobOptions, SubmitError, render

    old = "#!/bin/bash\n${python} -m pretrain ${subcommand} \"$RUN_DIR/config.yaml\"\n"  # copied before ${arguments}
    opts = JobOptions(gpus_per_node="0")
    assert "-m pretrain train" in render(old, subcommand="train", run_dir=tmp_path, cpus_per_task=1, opts=opts)
    with pytest.raises(SubmitError, match=r"needs add_task.model before its config, but the job template has no "):
        render(old, subcommand="add-task", run_dir=tmp_path, cpus_per_task=1, opts=opts,
               leading=[("add_task.model", "/m")])


def test_a_resubmission_that_its_run_would_refuse_writes_and_queues_nothing(tmp_path, monkeypatch, submit_cli):
    run = _fake_pretraining_run(tmp_path / "run")
    saved = (run / "config.yaml").read_bytes()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch: the drift check answers first
    code, _, err = submit_cli("submit", "train", DEBUG, f"output_dir={run}", "optim.lr=0.5")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "was trained with a different config and resuming would not be exact (optim.lr:" in err, err
    assert (run / "config.yaml").read_bytes() == saved and not (run / "slurm").exists()
    # safe changes (run length, cadence) pass, as they do on resume
    code, _, err = submit_cli("submit", "train", DEBUG, f"output_dir={run}", "train.max_steps=50",
                              "train.log_every=5", "--gpus-per-node", "0", "--dry-run")
    assert code == 0, err


def _fake_finetuning_run(run: Path, source: Path):
    """A fine-tuning run started from the run dir `source` (moe.num_experts 16, the overlay says 8): its first start
    adopted the source's sections into config.yaml and wrote its backbone record."""
    from dataclasses import replace

    from pretrain.config.finetuning import FinetuneConfig
    from pretrain.config.load import load_config, save_resolved
    from pretrain.finetune.record import BackboneRecord, adopt_record_, write_record

    source.mkdir()
    cfg = load_config(FINETUNE, [f"output_dir={run}", f"finetune.init_from={source}"], schema=FinetuneConfig)
    record = BackboneRecord(init_from=str(source), kind="run", model=cfg.model, moe=replace(cfg.moe, num_experts=16),
                            num_tasks=3, rows=("cls", "det", "seg"))
    adopt_record_(cfg, record)
    save_resolved(cfg, run)
    write_record(run, record)
    _fake_checkpoint(run, 20)
    return [f"output_dir={run}", f"finetune.init_from={source}"]


@pytest.mark.slow  # each fine-tuning config check builds its decoder on the meta device: ~3 s in all
def test_a_finetuning_resubmission_keeps_the_adopted_backbone_sections(tmp_path, submit_cli):
    from pretrain.cli import _finetune_resume_view
    from pretrain.cluster.render import JobOptions
    from pretrain.cluster.submit import prepare
    from pretrain.config.checks import ConfigError

    run = tmp_path / "ft"
    given = _fake_finetuning_run(run, tmp_path / "source")
    opts = JobOptions(gpus_per_node="0")
    # the overlay's moe section is not the run's: without the stage's view that is drift...
    with pytest.raises(ConfigError, match="moe.num_experts: 16 -> 8"):
        prepare("finetune", FINETUNE, [*given, "train.max_steps=60"], opts)
    # ...with it, a longer run is accepted, and the file the job reads keeps the backbone the run trains
    cfg, _, _ = prepare("finetune", FINETUNE, [*given, "train.max_steps=60"], opts, view=_finetune_resume_view)
    assert (cfg.moe.num_experts, cfg.train.max_steps) == (16, 60)
    code, _, err = submit_cli("submit", "finetune", FINETUNE, *given, "train.max_steps=60", "--gpus-per-node", "0",
                              "--dry-run")
    assert code == 0, err
    code, _, err = submit_cli("submit", "finetune", FINETUNE, *given, "optim.lr=0.5", "--dry-run")
    assert code == 2 and "(optim.lr: 0.003 -> 0.5)" in err, err
    # a run from before backbone records: model/moe come from its run-dir source, so the saved ones stay
    (run / "backbone.json").unlink()
    cfg, _, _ = prepare("finetune", FINETUNE, [*given, "train.max_steps=60"], opts, view=_finetune_resume_view)
    assert (cfg.moe.num_experts, cfg.train.max_steps) == (16, 60)


def test_a_direct_add_task_run_freezes_its_model_absolute(tmp_path, monkeypatch, submit_cli):
    """`pretrain add-task MODEL CONFIG` records MODEL as `pretrain submit add-task` does (absolute), so a run started
    by hand with a relative path and resubmitted through SLURM is not refused as a changed model."""
    _fake_pretraining_run(tmp_path / "my run")
    monkeypatch.chdir(tmp_path)
    import pretrain.add_task.train
    import pretrain.training.signals

    seen = []
    monkeypatch.setattr(pretrain.training.signals, "stop_flag", lambda: None)
    monkeypatch.setattr(pretrain.add_task.train, "main", lambda cfg: seen.append(cfg.add_task.model) or 0)
    code, _, err = submit_cli("add-task", "my run", ADD_TASK, f"output_dir={tmp_path}/out")
    assert code == 0, err
    from pretrain.cluster.render import JobOptions
    from pretrain.cluster.submit import prepare

    frozen, _, _ = prepare("add-task", ADD_TASK, [f"output_dir={tmp_path}/out", "add_task.model=my run"],
                           JobOptions(gpus_per_node="0"))
    assert seen == [str(tmp_path / "my run")] == [frozen.add_task.model]
