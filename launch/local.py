"""Run tarl_jax.main on this machine, optionally on simulated CPU devices or as several processes.

  python -m launch.local configs/tiny.py --workdir=runs/tiny
  python -m launch.local configs/tiny.py:runlocal --workdir=runs/fsdp --devices=8 \\
      --config.mesh.fsdp=2 --config.mesh.tensor=4
  python -m launch.local configs/tiny.py:runlocal --workdir=runs/2proc --processes=2 --devices=4
  python -m launch.local configs/tiny.py --workdir=runs/tiny -n      # print the command only

--devices N sets XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu, so a
laptop can exercise the sharded code paths of a pod. --processes P starts P copies of the main
command that form one multi-controller JAX job over 127.0.0.1 (CPU collectives over gloo): the
multi-host code paths without a cluster. Every host gets an equal share of each step's tasks, so
the tasks per step must divide by P.
"""
from __future__ import annotations

import os
import subprocess
import sys

from launch import common


def commands(args) -> list[list[str]]:
    env = {}
    if args.devices or args.processes > 1:
        # Simulated devices are CPU devices, and P processes must not all grab one GPU.
        env["JAX_PLATFORMS"] = "cpu"
    if args.devices:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
    if args.processes == 1:
        return [prefix + common.main_command(args.config, args.workdir, args.overrides)]
    return [prefix + common.main_command(args.config, args.workdir, args.overrides, multihost=True)
            + [f"--coordinator=127.0.0.1:{args.port}", f"--num_processes={args.processes}",
               f"--process_id={i}"] for i in range(args.processes)]


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, __spec__.name)
    common.add_main_args(p)
    p.add_argument("--devices", type=int, default=0, help="simulated CPU devices per process")
    p.add_argument("--processes", type=int, default=1, help="JAX processes on this machine")
    p.add_argument("--port", type=int, default=29500, help="coordinator port with --processes")
    common.add_dry_run(p)
    args = common.parse(p, argv)
    cmds = commands(args)
    if len(cmds) == 1:
        common.run(cmds[0], args.dry_run)
        return
    # Printed as a shell job list: the processes must run at the same time.
    for cmd in cmds:
        print(common.shell(cmd) + " &")
    print("wait", flush=True)
    if not args.dry_run:
        procs = [subprocess.Popen(cmd) for cmd in cmds]
        codes = [proc.wait() for proc in procs]
        if any(codes):
            sys.exit(f"exit statuses {codes}")


if __name__ == "__main__":
    main()
