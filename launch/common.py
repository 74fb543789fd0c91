"""What the launchers share: their common arguments, the main command, and printing/running it.

Every launcher takes a config (`configs/X.py` or `configs/X.py:ARG`), a `--workdir` and any
number of `--config.key=value` overrides, and builds the same `python -m tarl_jax.main` command.
Each command is printed as a shell line before it runs, so a dry run (`-n`) prints exactly what
would run and its output can be pasted into a shell.
"""
from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = ".venv/bin/python"   # made by scripts/setup.sh; commands run from the repository root
OVERRIDES_HELP = ("Arguments --config.key=value (anywhere on the line) are passed on to "
                  "tarl_jax.main as config overrides.")


def parser(doc: str, module: str) -> argparse.ArgumentParser:
    """A parser whose -h shows the module docstring (usage examples) verbatim."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   epilog=OVERRIDES_HELP, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_main_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="configs/X.py or configs/X.py:ARG (get_config's argument)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard")


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--dry-run", action="store_true", help="print the commands, run nothing")


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, with the `--config.key=value` overrides collected in order as `.overrides`.

    They are taken out before argparse sees them: argparse treats an argument containing a space
    (`--config.world.system_prompt=Be brief`) as a positional."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith("--config.")]
    for o in overrides:
        if "=" not in o:
            p.error(f"{o}: write overrides as --config.key=value")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    return args


def override(key: str, value) -> str:
    return f"--config.{key}={value}"


def main_command(config: str, workdir: str, overrides: list[str],
                 multihost: bool = False) -> list[str]:
    return [PYTHON, "-m", "tarl_jax.main", *(["--multihost"] if multihost else []),
            f"--config={config}", f"--workdir={workdir}", *overrides]


def shell(argv: list[str], stdin: str | None = None) -> str:
    """`argv` as one shell line; `stdin` becomes a quoted here-document (no expansion inside)."""
    line = shlex.join(argv)
    return line if stdin is None else f"{line} <<'EOF'\n{stdin}EOF"


def run(argv: list[str], dry_run: bool, stdin: str | None = None) -> None:
    """Print the command; unless dry_run, run it and stop on failure."""
    print(shell(argv, stdin), flush=True)
    if dry_run:
        return
    code = subprocess.run(argv, input=stdin, text=True).returncode
    if code:
        sys.exit(f"exit status {code}: {shlex.join(argv)}")
