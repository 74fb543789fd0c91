"""The launchers' dry runs: the exact commands for a 2-host TPU slice, 2 SLURM nodes x 8 GPUs and
one machine, and the expansion of configs/tiny.py's sweep. Nothing is submitted or trained; no
gcloud, sbatch or network is needed."""
import functools
import os
import shlex
import subprocess
import sys

import pytest

from launch import common, local, slurm, sweep, tpu

REPO = common.REPO
SPACED = "--config.world.system_prompt=Be brief. Confirm first."   # an override with spaces
MAIN = [".venv/bin/python", "-m", "tarl_jax.main"]


def dry_run(module, argv, capsys) -> list[str]:
    module.main([*argv, "-n"])
    return capsys.readouterr().out.splitlines()


def bash_syntax_ok(script: str) -> bool:
    return subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def test_local(capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert dry_run(local, ["configs/tiny.py", "--workdir=runs/t", "--config.rl.algo=rloo"],
                   capsys) == [".venv/bin/python -m tarl_jax.main --config=configs/tiny.py "
                               "--workdir=runs/t --config.rl.algo=rloo"]
    env = "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
    main = (".venv/bin/python -m tarl_jax.main --multihost --config=configs/tiny.py:runlocal "
            "--workdir=runs/2p --config.seed=1 --coordinator=127.0.0.1:29500 --num_processes=2")
    assert dry_run(local, ["configs/tiny.py:runlocal", "--workdir=runs/2p", "--processes=2",
                           "--devices=4", "--config.seed=1"], capsys) == [
        f"{env}{main} --process_id=0 &", f"{env}{main} --process_id=1 &", "wait"]


def test_overrides_keep_spaces_and_order(capsys):
    (line,) = dry_run(local, [SPACED, "configs/tiny.py", "--config.seed=3", "--workdir=w"], capsys)
    assert shlex.split(line) == [*MAIN, "--config=configs/tiny.py", "--workdir=w", SPACED,
                                 "--config.seed=3"]
    with pytest.raises(SystemExit):
        local.main(["configs/tiny.py", "--workdir=w", "--config.seed", "3", "-n"])


def test_tpu_pod_slice(capsys):
    where = ["my-tpu", "--zone=us-central2-b"]
    gcloud = "gcloud compute tpus tpu-vm"
    assert dry_run(tpu, ["create", *where, "--accelerator-type=v4-16"], capsys) == [
        f"{gcloud} create my-tpu --accelerator-type=v4-16 --version=tpu-ubuntu2204-base "
        "--zone=us-central2-b"]

    archive, scp, install = dry_run(tpu, ["setup", *where, "--project=proj"], capsys)
    assert archive == ("git archive --format=tar.gz --prefix=tarl_jax/ "
                       "-o /tmp/my-tpu-tarl_jax.tar.gz HEAD")
    assert scp == (f"{gcloud} scp /tmp/my-tpu-tarl_jax.tar.gz my-tpu:tarl_jax.tar.gz --worker=all "
                   "--zone=us-central2-b --project=proj")
    argv = shlex.split(install)
    assert argv[:7] == [*gcloud.split(), "ssh", "my-tpu", "--worker=all"]
    assert argv[7] == "--command" and argv[8] == tpu.REMOTE_SETUP and bash_syntax_ok(argv[8])
    assert "bash scripts/setup.sh" in argv[8] and '"jax[tpu]==' in argv[8]

    (run,) = dry_run(tpu, ["run", *where, "configs/tiny.py:runlocal", "--workdir=/mnt/shared/r",
                           "--config.rollout.tasks_per_step=4", SPACED], capsys)
    argv = shlex.split(run)
    assert argv[:9] == [*gcloud.split(), "ssh", "my-tpu", "--worker=all", "--command", argv[8]]
    remote = argv[8]
    assert bash_syntax_ok(remote)
    assert remote.startswith("set -o pipefail; cd tarl_jax && PYTHONUNBUFFERED=1 ")
    assert remote.endswith(" 2>&1 | tee -a run.log")
    # The remote shell sees the main command word for word, the spaced override intact.
    main = shlex.split(remote.split("PYTHONUNBUFFERED=1 ", 1)[1].rsplit(" 2>&1", 1)[0])
    assert main == [*MAIN, "--multihost", "--config=configs/tiny.py:runlocal",
                    "--workdir=/mnt/shared/r", "--config.rollout.tasks_per_step=4", SPACED]

    assert dry_run(tpu, ["logs", *where, "--worker=1"], capsys) == [
        f"{gcloud} ssh my-tpu --worker=1 --command 'tail -n 200 -F tarl_jax/run.log' "
        "--zone=us-central2-b"]
    assert dry_run(tpu, ["delete", *where], capsys) == [
        f"{gcloud} delete my-tpu --zone=us-central2-b"]


def test_tpu_refuses_what_cannot_work():
    with pytest.raises(SystemExit, match="gs://"):
        tpu.main(["run", "t", "--zone=z", "configs/tiny.py", "--workdir=gs://b/r", "-n"])
    with pytest.raises(SystemExit):   # overrides belong to `run` only
        tpu.main(["delete", "t", "--zone=z", "--config.seed=1", "-n"])


def test_slurm_two_nodes_eight_gpus(capsys):
    out = dry_run(slurm, ["configs/tiny.py", "--workdir=/shared/runs/t", "--nodes=2",
                          "--gpus-per-node=8", "--time=02:00:00", "--partition=gpu",
                          "--sbatch=--account=proj", SPACED], capsys)
    assert out[0] == "sbatch <<'EOF'" and out[-1] == "EOF"
    script = out[1:-1]
    assert script[:12] == [
        "#!/bin/bash",
        "#SBATCH --job-name=tarl_jax",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "set -euo pipefail",
        f"cd {REPO}",
        slurm.COORDINATOR,
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
    ]
    assert len(script) == 13
    assert shlex.split(script[12]) == ["srun", "--ntasks-per-node=1", "--label", *MAIN,
                                       "--multihost", "--config=configs/tiny.py",
                                       "--workdir=/shared/runs/t", SPACED]
    assert bash_syntax_ok("\n".join(script))


def test_slurm_coordinator_is_first_host_and_jax_port(tmp_path, monkeypatch):
    """The exported address is the job's first host, with the port JAX's own SLURM detection
    would choose (a stand-in scontrol expands the node list)."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="gpu[017-018]", SLURM_JOB_ID="123456")
    got = subprocess.run(["bash", "-c", f"{slurm.COORDINATOR}; echo $JAX_COORDINATOR_ADDRESS"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    from jax._src.clusters.slurm_cluster import SlurmCluster
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[017-018]")
    assert got == SlurmCluster.get_coordinator_address(None, None) == "gpu017:62016"


def test_sweep_expands_tiny(capsys):
    runs = sweep.expand("configs/tiny.py", "runs/sweep", ["--config.total_steps=3"])
    assert len(runs) == 3 * 2 * 3 * 2 == 36
    assert len({workdir for workdir, _ in runs}) == 36
    workdir, overrides = runs[0]
    assert workdir == ("runs/sweep/seed=0,rl.algo=grpo,rl.credit=trajectory,judge.kind=none,"
                       "math.fraction=0.0")
    assert overrides == ["--config.total_steps=3", "--config.seed=0", "--config.rl.algo=grpo",
                         "--config.rl.credit=trajectory", "--config.judge.kind=none",
                         "--config.math.fraction=0.0"]
    for point, (_, overrides) in zip(sweep.points("configs/tiny.py"), runs):
        c = sweep.apply("configs/tiny.py", overrides)   # exactly as tarl_jax.main parses them
        assert c.total_steps == 3
        for key, value in point.items():
            assert functools.reduce(getattr, key.split("."), c) == value, (key, value)
    with pytest.raises(SystemExit, match="nosuch"):
        sweep.apply("configs/tiny.py", ["--config.rl.nosuch=1"])


def test_sweep_emits_one_launcher_command_per_point(capsys):
    sweep.main(["configs/tiny.py", "--workdir=/shared/sweep", "--backend=slurm", "-n",
                "--", "--nodes=2", "--gpus-per-node=8"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 36
    first = shlex.split(lines[0])
    assert first[:6] == [".venv/bin/python", "-m", "launch.slurm", "--nodes=2",
                         "--gpus-per-node=8", "configs/tiny.py"]
    slurm_out = dry_run(slurm, first[3:], capsys)   # the emitted command, run as a dry run
    assert slurm_out[3] == "#SBATCH --nodes=2"
    assert shlex.split(slurm_out[-2])[-6:] == [
        "--workdir=/shared/sweep/seed=0,rl.algo=grpo,rl.credit=trajectory,judge.kind=none,"
        "math.fraction=0.0", "--config.seed=0", "--config.rl.algo=grpo",
        "--config.rl.credit=trajectory", "--config.judge.kind=none", "--config.math.fraction=0.0"]


def test_entry_points_and_usage():
    """`python -m launch.X` works from the repository root; -h shows the usage examples."""
    for name in ("local", "slurm", "tpu", "sweep"):
        out = subprocess.run([sys.executable, "-m", f"launch.{name}", "-h"], cwd=REPO,
                             capture_output=True, text=True)
        assert out.returncode == 0 and f"python -m launch.{name}" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "launch.sweep", "configs/tiny.py",
                          "--workdir=runs/sweep", "--backend=tpu", "-n", "--", "my-tpu",
                          "--zone=z"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 36 and all(l.startswith(".venv/bin/python -m launch.tpu run my-tpu "
                                                 "--zone=z configs/tiny.py --workdir=runs/sweep/")
                                    for l in lines)
