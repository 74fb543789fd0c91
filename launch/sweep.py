"""Expand a config's `sweep(add)` into one run per point, each in its own WORKDIR/<point name>.

  python -m launch.sweep configs/tiny.py --workdir=runs/sweep -n        # list the 36 runs
  python -m launch.sweep configs/tiny.py:runlocal --workdir=runs/sweep  # run them here, in turn
  python -m launch.sweep configs/tiny.py --workdir=/shared/sweep --backend=slurm \\
      -- --nodes=1 --gpus-per-node=8 --partition=gpu                    # one SLURM job per point
  python -m launch.sweep configs/tiny.py --workdir=/mnt/shared/sweep --backend=tpu \\
      -- my-tpu --zone=us-central2-b                                    # in turn on one slice

`sweep(add)` calls add(**{"dotted.key": value}) once per point. A point becomes
`--config.key=value` overrides, placed after those given here so the point's values win, and a
workdir named after them (e.g. runs/sweep/seed=0,rl.algo=grpo,...). Each run is one command of
the chosen launcher (launch.local, launch.slurm or `launch.tpu run`); the launcher's own
arguments go after `--` (`-- -n` makes each launcher print its command instead of running it).
Without -n the commands run one after another. Every point is first applied to the config
exactly as tarl_jax.main will apply it, so a mistyped key fails before anything starts.
"""
from __future__ import annotations

import importlib.util
import posixpath
import re
import sys

from absl import flags
from ml_collections import config_flags

from launch import common


def points(config: str) -> list[dict]:
    """The add(...) calls of the config file's sweep(), in order."""
    path = config.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("swept_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweep"):
        raise SystemExit(f"{path} has no sweep(add) function")
    out = []
    module.sweep(lambda **point: out.append(point))
    return out


def name(point: dict) -> str:
    """A readable, stable folder name: 'seed=0,rl.algo=grpo,...' with odd characters as '_'."""
    return re.sub(r"[^\w.,=+-]", "_", ",".join(f"{k}={v}" for k, v in point.items()))


def expand(config: str, workdir: str, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """[(run workdir, overrides)] for every point of the sweep."""
    runs = [(posixpath.join(workdir, name(point)),
             overrides + [common.override(k, v) for k, v in point.items()])
            for point in points(config)]
    workdirs = [w for w, _ in runs]
    if len(set(workdirs)) < len(runs):
        twice = sorted({w for w in workdirs if workdirs.count(w) > 1})
        raise SystemExit(f"{config}: sweep() points share a workdir: {twice}")
    return runs


def apply(config: str, overrides: list[str]):
    """The config tarl_jax.main would get from `--config=config` and these overrides."""
    argv = ["sweep", f"--config={config}", *overrides]
    flag_values = flags.FlagValues()
    # sys_argv: config_flags finds the override flags in the command line it is told about.
    config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    try:
        flag_values(argv)
    except Exception as e:   # absl and ml_collections raise several kinds; name the point
        raise SystemExit(f"{config}: cannot apply {' '.join(overrides)}: "
                         f"{type(e).__name__}: {e}") from e
    return flag_values.config


def launcher(backend: str, backend_args: list[str], config: str, workdir: str,
             overrides: list[str]) -> list[str]:
    return [common.PYTHON, "-m", f"launch.{backend}", *(["run"] if backend == "tpu" else []),
            *backend_args, config, f"--workdir={workdir}", *overrides]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, backend_args = argv[:cut], argv[cut + 1:]
    p = common.parser(__doc__, __spec__.name)
    common.add_main_args(p)
    p.add_argument("--backend", choices=("local", "slurm", "tpu"), default="local")
    common.add_dry_run(p)
    args = common.parse(p, argv)
    runs = expand(args.config, args.workdir, args.overrides)
    for _, overrides in runs:
        apply(args.config, overrides)
    for workdir, overrides in runs:
        common.run(launcher(args.backend, backend_args, args.config, workdir, overrides),
                   args.dry_run)


if __name__ == "__main__":
    main()
