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

# Packages whose modules are groups of their own (`runs.checkpoint` and `runs.integrity` obey different rules); in
# every other package the whole package is one group (`pretrain/models/decoders/mlore.py` is in `models`).
MODULE_GROUPS = frozenset({"config", "parallel", "runs", "training", "extraction", "cluster"})
CONFIG = frozenset({"config.checks", "config.pretraining", "config.finetuning", "config.add_task", "config.load"})
FOUNDATION = frozenset({"durable", "dist", "log", "errors", "catalog"}) | CONFIG
# `dist` imports torch.distributed at module level, so models and metrics may not import it (their reducers and
# communicators are injected).
NO_DIST = frozenset({"durable", "log", "catalog"}) | CONFIG
LEAF = FOUNDATION
# the commands may import any core module; cli imports them
COMMANDS = frozenset({"training.train", "training.evaluate", "extraction.export", "extraction.extract",
                      "extraction.command", "cluster.submit", "cluster.status"})
CORE = FOUNDATION | {"__init__", "synth", "prepare", "data", "models", "metrics", "training.signals",
                     "training.tracking", "training.routing_stats", "training.plots", "training.objective",
                     "training.lifecycle", "training.global_batch", "parallel.expert_parallel", "parallel.layers",
                     "parallel.engine", "parallel.ds_moe", "runs.checkpoint", "runs.rank_state", "runs.load",
                     "runs.portable", "runs.integrity", "runs.drift", "runs.expert_files", "runs.elastic_state",
                     "extraction.keep_rules", "cluster.render"}
ANY_CORE = CORE | COMMANDS  # what a command may import (minus other commands: see COMMAND_PAIRS)
# group -> the groups it may import besides itself and `pretrain/__init__` (version only), each with why.
# ARCHITECTURE.md's "Import rules" table is this dict rendered (`rules_table`); a test keeps them equal.
RULES: dict[str, frozenset[str]] = {
    "__init__": frozenset(),
    "__main__": frozenset({"cli"}),
    "durable": frozenset(), "dist": frozenset(), "log": frozenset(),
    "catalog": frozenset(),  # the datasets and tasks as records: imports nothing, not even torch
    "config": frozenset(), "parallel": frozenset(), "runs": frozenset(), "training": frozenset(),
    "extraction": frozenset(), "cluster": frozenset(),  # package docstrings
    "config.checks": frozenset(),  # what every schema's checks share (ConfigError lives there)
    "config.pretraining": frozenset({"config.checks", "catalog"}),
    "config.add_task": frozenset({"config.checks", "config.pretraining", "catalog"}),
    # models lazily: a decoder's options are checked by building it on the meta device
    "config.finetuning": frozenset({"config.checks", "config.pretraining", "catalog", "models"}),
    "config.load": frozenset({"durable"}) | CONFIG,  # the mechanism knows every schema: nothing registers itself
    "errors": CONFIG | {"dist"},  # lazily: ConfigError's exit code, the rank that reports
    "synth": LEAF, "prepare": LEAF, "data": LEAF | {"metrics"},  # the one reduce_zero_label lives in metrics
    "training.signals": LEAF, "training.tracking": LEAF, "training.routing_stats": LEAF, "training.plots": LEAF,
    "models": NO_DIST, "metrics": NO_DIST,
    "parallel.expert_parallel": FOUNDATION | {"models"},  # injects comms into the models' MoE layers
    "training.objective": FOUNDATION | {"models"},
    # what every loop shares (engine lazily)
    # (tracking: start_engine reads WANDB_MODE before anything starts)
    "training.lifecycle": FOUNDATION | {"training.signals", "runs.checkpoint", "parallel.engine", "training.tracking"},
    # layout-free forwards: models' keyed randomness, data's global positions
    "training.global_batch": FOUNDATION | {"models", "data"},
    "parallel.layers": FOUNDATION | {"models", "parallel.ds_moe"},  # the MoE layer factory (ds_moe only lazily)
    "parallel.ds_moe": FOUNDATION | {"models"},  # the DeepSpeed twin of models/moe
    "parallel.engine": FOUNDATION | {"models", "parallel.expert_parallel", "parallel.ds_moe"},
    "runs.integrity": FOUNDATION,  # the latest pointer, checkpoint manifests, fallback to an intact tag
    "runs.rank_state": FOUNDATION,  # a rank's RNG + stream state in a checkpoint (JSON + safetensors)
    "runs.expert_files": FOUNDATION | {"models", "runs.integrity"},  # experts under global ids, a CRC per expert
    "runs.elastic_state": FOUNDATION | {"runs.expert_files"},  # layout-free optimizer state
    "runs.checkpoint": FOUNDATION | {"models", "parallel.expert_parallel", "runs.integrity", "runs.rank_state",
                                     "runs.expert_files", "runs.elastic_state"},
    "runs.load": FOUNDATION | {"runs.checkpoint", "parallel.layers", "models", "training.objective", "data",
                               "runs.integrity"},  # a run directory -> its model, without DeepSpeed
    "runs.drift": FOUNDATION | {"runs.integrity"},  # resume safety: a config against the run's config.yaml
    "runs.portable": FOUNDATION | {"runs.checkpoint", "parallel.layers", "models", "training.objective",
                                   "runs.load", "data"},  # the portable model file
    "extraction.keep_rules": FOUNDATION,  # which experts a task keeps (pure functions over usage tables)
    "cluster.render": FOUNDATION,  # the job script from a template and JobOptions (pure text, no SLURM call)
    **{command: ANY_CORE for command in sorted(COMMANDS)},
    "extraction.command": ANY_CORE | {"extraction.report", "extraction.heal"},  # `pretrain extract` itself
    "extraction.report": ANY_CORE,  # full vs submodel: a part of `pretrain extract`
    "extraction.heal": ANY_CORE,  # `pretrain extract --heal`: distillation on the training engine
    "extraction.sweep": ANY_CORE | {"extraction.report"},  # `pretrain extract --sweep`: several sizes
    "finetune": ANY_CORE,  # stage 3 imports the core; the core never imports it
    "add_task": ANY_CORE,  # `pretrain add-task` (a stage like finetune): imports the core; only cli imports it
    "demo": ANY_CORE | {"finetune", "cli"},  # stage 4 drives the user-facing commands
    "extraction.args": frozenset(),  # the export/extract command lines (argparse only): cli reads them
    "cli": ANY_CORE | {"finetune", "demo", "extraction.sweep", "extraction.args", "add_task"},
}
COMMAND_IMPORTERS = frozenset({"cli", "demo"})  # "nothing imports them except cli" (+ the demo pipeline)
# the commands that build on another command's functions
COMMAND_PAIRS = frozenset({("training.train", "training.evaluate"), ("add_task", "extraction.export"),
                           ("add_task", "training.evaluate"), ("cluster.submit", "cluster.status"),
                           ("extraction.extract", "extraction.export"), ("extraction.report", "training.evaluate"),
                           ("extraction.report", "extraction.extract"), ("extraction.command", "extraction.extract"),
                           ("extraction.sweep", "extraction.extract"), ("extraction.heal", "extraction.extract")})
DEEPSPEED_ANYWHERE = frozenset({"pretrain.parallel.engine", "pretrain.parallel.ds_moe"})
DEEPSPEED_LAZY = frozenset({"pretrain.parallel.layers"})  # may import deepspeed in a function, never at module level
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
    if len(parts) > 2 and parts[1] in MODULE_GROUPS:
        return ".".join(parts[1:3])
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
    assert {"pretrain.training.train", "pretrain.models.moe", "pretrain.parallel.engine",
            "pretrain.config.pretraining"} <= MODULES.keys()


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
    deepspeed = {"parallel.engine", "parallel.ds_moe"}
    may_load = {g for g, allowed in RULES.items() if allowed & deepspeed} | deepspeed
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
              "from ..config.pretraining import RunConfig\nfrom pretrain import dist\nfrom .heads import cls\n\n"
              "def f():\n    import deepspeed\n")
    found = imports_of(PACKAGE / "models" / "probe.py", source)
    assert {(i.name, i.lazy) for i in found} == {
        ("torch.distributed", False), ("torch", False), ("pretrain.models.moe_losses", False),
        ("pretrain.config.pretraining", False), ("pretrain.dist", False), ("pretrain.models.heads.cls", False),
        ("deepspeed", True)}
    assert violations("pretrain.models.probe", found) == [
        "5: pretrain.dist (group 'models' may import " + str(sorted(NO_DIST)) + ")"]


def test_no_absolute_machine_paths_in_the_package():
    """A docstring or message naming /work/..., /home/... or /root/... means nothing on a reader's machine."""
    import re

    pattern = re.compile(r"""['"` (](/work|/home|/root|/tmp)/""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "pretrain").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (lazy ones too: a lazy import is still a dependency)."""
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for imp in imports_of(path):
            name = imp.name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and not (module.startswith(name + ".") and MODULES[name].name == "__init__.py"):
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    """No two modules import each other, directly or through others, lazily or not (a cycle is a design knot: two
    modules that cannot be understood or changed apart)."""
    assert cycles(_graph()) == []


def rules_table() -> str:
    """`RULES` as ARCHITECTURE.md's table: group | may import (foundation named once as a set)."""
    def names(allowed: frozenset[str]) -> str:
        parts = []
        for label, part in (("ANY_CORE", ANY_CORE), ("FOUNDATION", FOUNDATION), ("CONFIG", CONFIG)):
            if part <= allowed:
                parts.append(label)
                allowed = allowed - part
        return ", ".join(parts + [f"`{n}`" for n in sorted(allowed)]) or "nothing"
    rows = [f"| `{group}` | {names(allowed)} |" for group, allowed in RULES.items()]
    legend = [f"- {label}: " + ", ".join(f"`{n}`" for n in sorted(part)) for label, part in
              (("FOUNDATION", FOUNDATION), ("CONFIG", CONFIG), ("ANY_CORE", ANY_CORE))]
    return "\n".join(["| group | may import (besides itself and `pretrain/__init__`) |", "|---|---|", *rows, "",
                      *legend])


def test_architecture_md_holds_the_rules_table():
    """One source for the import rules: RULES here; ARCHITECTURE.md holds its rendering between the markers."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    begin, end = "<!-- import-rules: generated from tests/test_architecture.py RULES -->", "<!-- /import-rules -->"
    assert begin in text and end in text, f"ARCHITECTURE.md lacks the markers {begin} ... {end}"
    held = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert held == rules_table(), "ARCHITECTURE.md's import rules differ from RULES: paste\n" + rules_table()
