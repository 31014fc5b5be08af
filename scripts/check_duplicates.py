"""Fail on duplicated code blocks in the package that are not in the accepted baseline.

    .venv/bin/python scripts/check_duplicates.py            # CI: exit 1 on a new duplicated block
    .venv/bin/python scripts/check_duplicates.py --update   # accept today's blocks (review the diff first)

pylint's similarity checker (R0801, `duplicate-code`) finds the blocks: at least MIN_LINES similar lines, ignoring
imports, docstrings, comments and signatures. A block is identified by the modules that hold it and a hash of its
stripped lines, not by line numbers, so unrelated edits above a known block do not make it new. The baseline
(`scripts/duplicates_baseline.txt`) lists the accepted blocks, one per line; an entry whose block is gone is reported
so the baseline can shrink, but only a new block fails.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "scripts" / "duplicates_baseline.txt"
MIN_LINES = 6
PYLINT = ["--disable=all", "--enable=duplicate-code", f"--min-similarity-lines={MIN_LINES}", "--ignore-imports=yes",
          "--ignore-docstrings=yes", "--ignore-comments=yes", "--ignore-signatures=yes", "--score=no",
          "--persistent=no"]


def find_blocks(paths: list[str], cwd: Path = ROOT) -> dict[str, str]:
    """Every duplicated block pylint reports under `paths`: key (`modA modB sha`) → a one-line description."""
    proc = subprocess.run([sys.executable, "-m", "pylint", *PYLINT, *paths], cwd=cwd, capture_output=True, text=True)
    if proc.returncode & 1 or proc.returncode & 32:  # fatal / usage error (duplicates alone set bit 8, refactor)
        raise SystemExit(f"pylint failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    blocks: dict[str, str] = {}
    for chunk in proc.stdout.split("R0801: Similar lines in ")[1:]:
        lines = chunk.splitlines()[1:]
        where = [ln[2:] for ln in lines if ln.startswith("==")]
        code = [ln.strip() for ln in lines[len(where):] if ln.strip() and not ln.startswith("*" * 5)]
        # pylint prints the block from either file, comments included: hash the code alone, so the key is stable
        code = [ln.removesuffix("(duplicate-code)").split("  #", 1)[0].strip() for ln in code]
        code = [ln for ln in code if ln and not ln.startswith("#")]
        modules = sorted({w.split(":")[0] for w in where})
        digest = hashlib.sha1("\n".join(code).encode()).hexdigest()[:12]
        blocks[f"{' '.join(modules)} {digest}"] = f"{', '.join(where)}: {code[0][:60] if code else ''}"
    return blocks


def read_baseline(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="write today's blocks as the accepted baseline")
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("paths", nargs="*", default=["pretrain"])
    args = ap.parse_args(argv)
    blocks = find_blocks(args.paths)
    if args.update:
        header = "# accepted duplicated blocks (scripts/check_duplicates.py --update): modules, hash  # where today\n"
        args.baseline.write_text(header + "".join(f"{k}  # {v}\n" for k, v in sorted(blocks.items())))
        print(f"{args.baseline}: {len(blocks)} accepted blocks")
        return 0
    accepted = read_baseline(args.baseline)
    new = {k: v for k, v in blocks.items() if k not in accepted}
    for key in sorted(accepted - blocks.keys()):
        print(f"gone (remove from {args.baseline.name}): {key}")
    for _key, where in sorted(new.items()):
        print(f"new duplicated block ({MIN_LINES}+ similar lines): {where}")
    if new:
        print(f"{len(new)} new duplicated block(s): share the code, or accept with --update and say why in the commit")
        return 1
    print(f"no new duplicated blocks ({len(blocks)} accepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
