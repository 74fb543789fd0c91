"""A Cloud TPU VM slice (single host or pod) through gcloud: create, setup, run, logs, delete.

  python -m launch.compile configs/qwen3_8b_retail.py --topology=v5p-64   # fits? (no TPU needed)
  python -m launch.tpu create my-tpu --zone=us-central2-b --accelerator-type=v5p-64
  python -m launch.tpu setup  my-tpu --zone=us-central2-b
  python -m launch.tpu run    my-tpu --zone=us-central2-b configs/qwen3_8b_retail.py \\
      --workdir=/mnt/shared/qwen3_8b --config.model.hf_dir=/mnt/shared/Qwen3-8B
  python -m launch.tpu logs   my-tpu --zone=us-central2-b --worker=1
  python -m launch.tpu delete my-tpu --zone=us-central2-b
  (add -n to any of them to print the gcloud commands instead of running them)

setup  ships this checkout's last commit (`git archive HEAD`: commit first) to ~/tarl_jax on
       every worker, installs Python 3.11 there, runs scripts/setup.sh and adds libtpu
       (jax[tpu] at the installed jax version).
run    starts the same command on every worker (one JAX process per host, `--multihost`) and
       streams their output until they finish; each worker also appends it to ~/tarl_jax/run.log.
       Keep the launcher in tmux/screen for long runs: closing it ends the run.
logs   follows one worker's run.log (worker 0 prints the metrics).
--workdir must be one directory that every worker sees (all hosts write each checkpoint), e.g.
an NFS share or a bucket mounted with gcsfuse at the same path on every worker.
"""
from __future__ import annotations

import argparse
import shlex

from launch import common

# Runs on every worker. TPU VM images ship an older Python; setup.sh needs 3.11 (the jax pin).
REMOTE_SETUP = (
    "tar xzf tarl_jax.tar.gz && sudo apt-get update -qq"
    " && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv"
    " && cd tarl_jax && PYTHON=python3.11 bash scripts/setup.sh"
    " && .venv/bin/pip install -q"
    ' "jax[tpu]==$(.venv/bin/python -c "import jax; print(jax.__version__)")"')


def gcloud(args, verb: str, *rest: str) -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
            + ([f"--project={args.project}"] if args.project else []))


def ssh(args, command: str, worker: str = "all") -> list[str]:
    return gcloud(args, "ssh", args.name, f"--worker={worker}", "--command", command)


def commands(args) -> list[list[str]]:
    if args.action == "create":
        return [gcloud(args, "create", args.name, f"--accelerator-type={args.accelerator_type}",
                       f"--version={args.version}", *(["--spot"] if args.spot else []))]
    if args.action == "setup":
        tarball = f"/tmp/{args.name}-tarl_jax.tar.gz"
        return [["git", "archive", "--format=tar.gz", "--prefix=tarl_jax/", "-o", tarball, "HEAD"],
                gcloud(args, "scp", tarball, f"{args.name}:tarl_jax.tar.gz", "--worker=all"),
                ssh(args, REMOTE_SETUP)]
    if args.action == "run":
        if args.workdir.startswith("gs://"):
            # The trainer writes its workdir with pathlib: a gs:// URL would become a local folder.
            raise SystemExit("--workdir: give a directory every worker sees (gcsfuse mount, NFS), "
                             "not a gs:// URL")
        main = common.main_command(args.config, args.workdir, args.overrides, multihost=True)
        return [ssh(args, "set -o pipefail; cd tarl_jax && PYTHONUNBUFFERED=1 "
                          f"{shlex.join(main)} 2>&1 | tee -a run.log")]
    if args.action == "logs":
        return [ssh(args, "tail -n 200 -F tarl_jax/run.log", worker=args.worker)]
    return [gcloud(args, "delete", args.name)]   # gcloud asks for confirmation


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, __spec__.name)
    shared = argparse.ArgumentParser(add_help=False)   # what every subcommand takes
    shared.add_argument("name", help="TPU VM name")
    shared.add_argument("--zone", required=True)
    shared.add_argument("--project", default="", help="default: gcloud's configured project")
    common.add_dry_run(shared)
    sub = p.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", parents=[shared], help="create the slice")
    create.add_argument("--accelerator-type", required=True, help="e.g. v4-16 (2 hosts), v5p-32")
    create.add_argument("--version", default="tpu-ubuntu2204-base",
                        help="TPU VM image: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, "
                             "v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e")
    create.add_argument("--spot", action="store_true", help="a cheaper, preemptible Spot slice")
    sub.add_parser("setup", parents=[shared], help="ship the code, install")
    run = sub.add_parser("run", parents=[shared], epilog=common.OVERRIDES_HELP,
                         help="run tarl_jax.main on every worker")
    common.add_main_args(run)
    logs = sub.add_parser("logs", parents=[shared], help="follow a worker's log")
    logs.add_argument("--worker", default="0")
    sub.add_parser("delete", parents=[shared], help="delete the slice")
    args = common.parse(p, argv)
    if args.overrides and args.action != "run":
        p.error(f"{args.action} takes no --config overrides")
    for cmd in commands(args):
        common.run(cmd, args.dry_run)


if __name__ == "__main__":
    main()
