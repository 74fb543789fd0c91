"""Submit tarl_jax.main to a SLURM GPU cluster: one process per node, driving all its GPUs.

  python -m launch.slurm configs/qwen3_8b_retail.py --workdir=/shared/runs/qwen3_8b \\
      --nodes=2 --gpus-per-node=8 --time=24:00:00 --partition=gpu --sbatch=--account=myproj \\
      --config.model.hf_dir=/shared/Qwen3-8B
  python -m launch.slurm configs/tiny.py --workdir=/shared/runs/tiny -n   # print, submit nothing

The batch script is passed to `sbatch` on its standard input; -n prints it as the here-document
that would be submitted. It runs from this checkout (which must be on a filesystem every node
sees, with .venv set up for GPUs: see launch/README.md), and --workdir must be shared too.
The script exports JAX_COORDINATOR_ADDRESS (first host of the job, port from the job id) and
JAX_LOCAL_DEVICE_IDS; jax.distributed.initialize() (`--multihost`) reads both and detects the
process count and index itself from SLURM_NTASKS and SLURM_PROCID. Its own SLURM detection would
also find the coordinator, but it assumes one process per GPU (it would give each process only
GPU SLURM_LOCALID): JAX_LOCAL_DEVICE_IDS is what lets one process per node use all of them.
"""
from __future__ import annotations

import shlex

from launch import common

COORDINATOR = ('export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
               '| head -n 1):$((61440 + SLURM_JOB_ID % 4096))"')   # JAX's own port choice


def script(args) -> str:
    sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={args.gpus_per_node}", f"--time={args.time}",
              *([f"--partition={args.partition}"] if args.partition else []), *args.sbatch]
    main = common.main_command(args.config, args.workdir, args.overrides, multihost=True)
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "set -euo pipefail",
        f"cd {shlex.quote(str(common.REPO))}",
        COORDINATOR,
        "export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(args.gpus_per_node))),
        common.shell(["srun", "--ntasks-per-node=1", "--label", *main]),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, __spec__.name)
    common.add_main_args(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--time", default="24:00:00", help="wall-clock limit, HH:MM:SS")
    p.add_argument("--partition", default="")
    p.add_argument("--job-name", default="tarl_jax")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another sbatch option, e.g. --sbatch=--account=X (repeatable)")
    common.add_dry_run(p)
    args = common.parse(p, argv)
    common.run(["sbatch"], args.dry_run, stdin=script(args))


if __name__ == "__main__":
    main()
