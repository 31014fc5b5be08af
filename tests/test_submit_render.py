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
    from pretrain.cluster.submit import TEMPLATE, JobOptions, render

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
    from pretrain.cluster.submit import SubmitError

    with pytest.raises(SubmitError) as caught:
        _render(tmp_path, monkeypatch, run, **opts)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_status_of_a_folder_that_is_no_run_is_exit_2(tmp_path, capsys):
    from pretrain.cli import main as cli_main

    assert cli_main(["status", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("train: {max_steps: 3}\n")  # a submitted run before its first job
    assert cli_main(["status", str(tmp_path)]) == 0
