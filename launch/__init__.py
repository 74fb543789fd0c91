"""Launchers: `python -m launch.{local,slurm,tpu,sweep} -h` from the repository root."""
