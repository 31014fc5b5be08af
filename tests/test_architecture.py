"""ARCHITECTURE.md's import direction, held by a test: every `pretrain` module imports only what its group may.

The table below is ARCHITECTURE.md's "Import direction" section as data (plus the modules the coming stages add, so
the test passes when they land where house-style §4 places them). Imports are read with `ast` from every file under
pretrain/: absolute and relative, at module level and inside functions alike (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pretrain"
MAX_LINES = 600  # house style: 400 per file, 600 hard

FOUNDATION = frozenset({"durable", "dist", "log", "config", "config_checks", "errors"})
# `dist` imports torch.distributed at module level, so models and metrics may not import it (their reducers and
# communicators are injected).
NO_DIST = frozenset({"durable", "log", "config", "config_checks"})
LEAF = FOUNDATION
# the commands may import any core module; cli imports them
COMMANDS = frozenset({"train", "evaluate", "export", "extract", "submit", "status"})
CORE = frozenset({"durable", "dist", "log", "config", "config_checks", "synth", "prepare", "data", "models",
                  "metrics", "signals", "tracking", "routing_stats", "plots", "expert_parallel", "tasks",
                  "objective", "loop", "layers", "engine", "ds_moe", "checkpoint", "rank_state", "runs", "portable",
                  "keep_rules", "__init__", "errors", "integrity", "drift", "expert_files", "elastic_state"})
ANY_CORE = CORE | COMMANDS  # what a command may import (minus other commands: see COMMAND_IMPORTERS)
# group -> the groups it may import besides itself and `pretrain/__init__` (version only). Group = first name
# under pretrain/ (`pretrain/models/decoders/mlore.py` is in `models`).
RULES: dict[str, frozenset[str]] = {
    "__init__": frozenset(),
    "__main__": frozenset({"cli"}),
    "durable": frozenset(), "dist": frozenset(), "log": frozenset(),
    "config": frozenset({"durable", "config_checks"}),
    "config_checks": frozenset(),  # the checks both schemas share (ConfigError lives there)
    "errors": frozenset({"config", "dist"}),  # lazily: ConfigError's exit code, the rank that reports
    "synth": LEAF, "prepare": LEAF, "data": LEAF | {"metrics"},  # the one reduce_zero_label lives in metrics
    "signals": LEAF, "tracking": LEAF, "routing_stats": LEAF,
    "plots": LEAF,
    "models": NO_DIST, "metrics": NO_DIST,  # models/decoders, dense, submodel, modsquad; metrics/{depth,...}
    "expert_parallel": FOUNDATION | {"models"},  # injects comms into the models' MoE layers (moe_modules)
    "tasks": FOUNDATION | {"models"},
    "objective": FOUNDATION | {"models"},  # replaces tasks
    "loop": FOUNDATION | {"signals", "checkpoint", "engine"},  # what both loops share (engine lazily)
    "layers": FOUNDATION | {"models", "ds_moe"},  # the MoE layer factory (ds_moe/deepspeed only lazily)
    "ds_moe": FOUNDATION | {"models"},  # not spelled out in ARCHITECTURE.md: the DeepSpeed twin of models/moe
    "engine": FOUNDATION | {"models", "expert_parallel", "ds_moe"},  # ds_moe: `moe.backend=deepspeed`
    "integrity": FOUNDATION,  # the latest pointer, checkpoint manifests, fallback to an intact tag
    "rank_state": FOUNDATION,  # a rank's RNG + stream state in a checkpoint (JSON + safetensors)
    "expert_files": FOUNDATION | {"models", "integrity"},  # experts under global ids, a checksum per expert
    "elastic_state": FOUNDATION | {"expert_files"},  # layout-free optimizer state (DeepSpeed's only duck-typed)
    "checkpoint": FOUNDATION | {"models", "expert_parallel", "integrity", "rank_state", "expert_files",
                                "elastic_state"},
    "runs": FOUNDATION | {"checkpoint", "layers", "models", "objective", "data", "integrity"},  # run dir -> model
    "drift": FOUNDATION | {"integrity"},  # resume safety: a config against the run's config.yaml
    "portable": FOUNDATION | {"checkpoint", "layers", "models", "objective", "runs", "data"},  # portable files
    "keep_rules": FOUNDATION,  # which experts a task keeps (pure functions over usage tables)
    "extract_report": ANY_CORE,  # the report of `pretrain extract` (a part of that command)
    **{command: ANY_CORE for command in COMMANDS},
    "extract": ANY_CORE | {"extract_report", "heal"},  # its report lives beside it; --heal
    "heal": ANY_CORE,  # `pretrain extract --heal`: distillation on the training engine
    "extract_sweep": ANY_CORE | {"extract", "extract_report"},  # `pretrain extract --sweep`: several sizes
    "finetune": ANY_CORE,  # stage 3 imports the core; the core never imports it
    "add_task": ANY_CORE,  # `pretrain add-task` (a stage like finetune): imports the core; only cli imports it
    "demo": ANY_CORE | {"finetune", "cli"},  # stage 4 drives the user-facing commands
    "extract_args": frozenset(),  # the export/extract command lines (argparse only): cli reads them
    "cli": ANY_CORE | {"finetune", "demo", "extract_sweep", "extract_args", "add_task"},
}
COMMAND_IMPORTERS = frozenset({"cli", "demo"})  # "nothing imports them except cli" (+ the demo pipeline)
# train's periodic evaluation; submit reads the run state status computes (ARCHITECTURE.md says so)
COMMAND_PAIRS = frozenset({("train", "evaluate"), ("add_task", "export"), ("add_task", "evaluate"),
                           ("submit", "status"), ("extract", "export"),
                           ("extract_report", "evaluate"), ("extract_report", "extract"),
                           ("extract_sweep", "extract"), ("extract_sweep", "extract_report")})
DEEPSPEED_ANYWHERE = frozenset({"pretrain.engine", "pretrain.ds_moe"})
DEEPSPEED_LAZY = frozenset({"pretrain.layers"})  # may import deepspeed inside a function, never at module level
# Which modules today's tree puts in breach of the table, and why (strict: the test fails once they are fixed, so the
# entry gets removed).
KNOWN: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    name: str  # the module imported: `pretrain.models.moe`, `torch.distributed`, `deepspeed.moe.layer`
    line: int
    lazy: bool  # inside a function (runs when called, not when the module is imported)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}


def _resolve(base: str, names: list[str]) -> list[str]:
    """`from base import a, b`: the submodule `base.a` where one exists (inside pretrain), else `base`.
    Outside the package both are kept (`from torch import distributed` imports torch.distributed)."""
    if not base.startswith("pretrain"):
        return [base] + [f"{base}.{n}" for n in names]
    return sorted({f"{base}.{n}" if f"{base}.{n}" in MODULES else base for n in names})


@cache
def imports_of(path: Path, source: str | None = None) -> tuple[Import, ...]:
    """Every import in the file (or in `source`, read as if it were that file), resolved to absolute module names."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def walk(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                else:
                    base = child.module
                found.extend(Import(n, child.lineno, inside) for n in _resolve(base, [a.name for a in child.names]))
            walk(child, inside)

    walk(ast.parse(path.read_text() if source is None else source, filename=str(path)), False)
    return tuple(found)


def violations(module: str, imports: tuple[Import, ...] | None = None) -> list[str]:
    """Imports of `module` (read from its file unless given) that its group may not make, as `line: name (reason)`."""
    group, out = group_of(module), []
    for imp in imports_of(MODULES[module]) if imports is None else imports:
        if not imp.name.startswith("pretrain"):
            continue
        target = group_of(imp.name)
        if target in (group, "__init__"):
            continue
        if target not in RULES[group]:
            out.append(f"{imp.line}: {imp.name} (group {group!r} may import {sorted(RULES[group])})")
        elif target in COMMANDS and group not in COMMAND_IMPORTERS and (group, target) not in COMMAND_PAIRS:
            out.append(f"{imp.line}: {imp.name} (only {sorted(COMMAND_IMPORTERS)} import the commands)")
    return out


def test_the_package_is_found():
    assert {"pretrain.train", "pretrain.models.moe", "pretrain.engine", "pretrain.config"} <= MODULES.keys()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_group_in_the_table(module):
    assert group_of(module) in RULES, f"{MODULES[module]}: add its group to RULES (and to ARCHITECTURE.md)"


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN[m])) if m in KNOWN else m
    for m in sorted(MODULES) if group_of(m) in RULES])
def test_imports_follow_the_table(module):
    assert not violations(module), f"{MODULES[module]}:\n" + "\n".join(violations(module))


def _imports_matching(module: str, prefixes: tuple[str, ...]) -> list[Import]:
    return [i for i in imports_of(MODULES[module]) if i.name.startswith(prefixes)]


def test_models_and_metrics_never_import_deepspeed_or_torch_distributed():
    bad = {m: [f"{i.line}: {i.name}" for i in _imports_matching(m, ("deepspeed", "torch.distributed"))]
           for m in MODULES if group_of(m) in ("models", "metrics")}
    assert not {m: b for m, b in bad.items() if b}


def test_only_engine_and_ds_moe_import_deepspeed():
    bad = {}
    for module in MODULES:
        found = _imports_matching(module, ("deepspeed",))
        if module in DEEPSPEED_LAZY:
            found = [i for i in found if not i.lazy]
        if found and module not in DEEPSPEED_ANYWHERE:
            bad[module] = [f"{i.line}: {i.name}" for i in found]
    assert not bad


def _loads_at_import(module: str) -> set[str]:
    """Every module (internal and external) that importing `module` loads, following module-level imports only;
    importing `a.b.c` runs `a` and `a.b` first."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for i in range(1, len(name.split(".")) + 1):
            prefix = ".".join(name.split(".")[:i])
            if prefix in seen:
                continue
            seen.add(prefix)
            if prefix in MODULES:
                todo.extend(imp.name for imp in imports_of(MODULES[prefix]) if not imp.lazy)
    return seen


def test_importing_the_core_never_loads_deepspeed():
    """Only a module that may import engine/ds_moe may load DeepSpeed when imported (checkpoints and models load in a
    process without it: `pretrain evaluate`, extraction, fine-tuning)."""
    may_load = {g for g, allowed in RULES.items() if allowed & {"engine", "ds_moe"}} | {"engine", "ds_moe"}
    bad = {m: sorted(n for n in _loads_at_import(m) if n.startswith("deepspeed"))[:3]
           for m in MODULES if group_of(m) not in may_load}
    assert not {m: b for m, b in bad.items() if b}


def test_nothing_in_the_core_imports_finetune_or_demo():
    for group, allowed in RULES.items():
        if group in CORE | COMMANDS:
            assert not allowed & {"finetune", "demo", "cli"}, group


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_the_hard_line_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (hard limit {MAX_LINES}): split it"


def test_the_reader_resolves_every_import_form():
    """Relative, `from package import submodule`, lazy and external forms, read as a file in models/."""
    source = ("import torch.distributed as tdist\nfrom torch import distributed\nfrom . import moe_losses\n"
              "from ..config import RunConfig\nfrom pretrain import dist\nfrom .heads import cls\n\n"
              "def f():\n    import deepspeed\n")
    found = imports_of(PACKAGE / "models" / "probe.py", source)
    assert {(i.name, i.lazy) for i in found} == {
        ("torch.distributed", False), ("torch", False), ("pretrain.models.moe_losses", False),
        ("pretrain.config", False), ("pretrain.dist", False), ("pretrain.models.heads.cls", False),
        ("deepspeed", True)}
    assert violations("pretrain.models.probe", found) == [
        "5: pretrain.dist (group 'models' may import ['config', 'config_checks', 'durable', 'log'])"]


def test_no_absolute_machine_paths_in_the_package():
    """A docstring or message naming /work/..., /home/... or /root/... means nothing on a reader's machine."""
    import re

    pattern = re.compile(r"""['"` (](/work|/home|/root|/tmp)/""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "pretrain").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
