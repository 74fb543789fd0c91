"""Compile every program a config runs, ahead of time, for a TPU topology, on this machine: know
before launch whether it fits each chip's HBM and what speed its shape allows.

  python -m launch.compile configs/qwen3_8b_retail.py --topology=v5p-64
  python -m launch.compile configs/omni_7b_speech.py --topology=v5p-128 --config.rl.microbatches=2
  python -m launch.compile configs/tiny.py --topology=v5e-4 --json=fit.json
  python -m launch.compile configs/qwen3_8b_retail.py --topology=v5p-64 --only=decode --collectives

--topology: an accelerator type (v4-16, v5p-64: TensorCores, two a chip; v5e-16, v6e-16:
chips) or chips per dimension (v5p:2x4x4). Programs: the RL train step at every pack bucket
(pack.rows x pack.seq_lens), the warm start's step, the scoring pass (KL reference / PPO
values), the sampler's prefill and decode for rollouts and evaluation at the rollout cache
length and the rows each host samples, and the audio encoder of speech configs. For each: bytes
a chip holds (arguments, outputs, XLA temporaries, code, and what stays resident meanwhile, e.g.
the train state beside the sampler) against the chip's HBM, an estimated roofline time and MFU
bound (tarl_jax/aot.py says how they are counted), and its collectives (--collectives: each
one, with the jax operation it serves). Exit 1 when anything does not fit, naming the program,
by how much, and the knobs that help; exit 2 for bad arguments or no libtpu.

No weights are read (shapes come from the preset, or from model.hf_dir's config.json when it
exists). libtpu describes the chips: scripts/setup.sh installs it into .venv/libtpu, out of the
venv's import path, so ordinary runs never start a TPU backend.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_DIR = REPO / ".venv" / "libtpu"
LIBTPU = "libtpu==0.0.42"    # the version jax[tpu]==0.10.2 pins


def _use_libtpu() -> None:
    """libtpu importable, and jax kept on CPU for everything but describing the topology (no
    TPU backend is started, so no warnings about a missing TPU)."""
    if LIBTPU_DIR.is_dir() and str(LIBTPU_DIR) not in sys.path:
        sys.path.insert(0, str(LIBTPU_DIR))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu asks a TPU VM's metadata server who its peers are; here there is none to ask.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    # No chip is opened, so compilations may run side by side (libtpu's lockfile says otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def model_shapes(config):
    """(DecoderConfig, AudioConfig | None) of the config's model, without weights."""
    from tarl_jax import components
    from tarl_jax.models import audio, omni, presets
    m = config.model
    overrides = dict(dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
                     attn_chunk=m.attn_chunk)
    hf_config = pathlib.Path(m.hf_dir or "-") / "config.json"
    if m.audio == "hf" and hf_config.is_file():
        t = omni.ThinkerConfig.from_hf(json.loads(hf_config.read_text()), text_overrides=overrides)
        return t.text, t.audio
    name = str(hf_config) if hf_config.is_file() else m.preset
    if not name:
        raise ValueError("model.preset is empty and model.hf_dir has no config.json: give one "
                         f"(presets: {sorted(presets.PRESETS)})")
    cfg = dataclasses.replace(components.model_shape(name), **overrides)
    if m.audio == "hf":   # an Omni thinker's encoder: AudioConfig's defaults are Omni-7B's
        return cfg, dataclasses.replace(audio.AudioConfig(), output_dim=cfg.hidden_size)
    return cfg, presets.audio(m.audio, cfg.hidden_size) if m.audio else None


def report(results, chip, failures, each: bool = False) -> str:
    from tarl_jax import aot
    rows = [r.row(chip) for r in results]
    head = (f"{'program':34s} {'chips':>5s} {'args':>7s} {'out':>6s} {'temp':>7s} {'resid':>6s} "
            f"{'total':>7s} / {'HBM':<5s} {'TFLOP':>7s} {'est s':>8s} {'bound':>7s} {'MFU<=':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = "" if r["fits"] else "  DOES NOT FIT"
        lines.append(
            f"{r['program']:34s} {r['chips']:5d} {r['argument_gib']:7.2f} {r['output_gib']:6.2f} "
            f"{r['temp_gib']:7.2f} {r['resident_gib']:6.2f} {r['total_gib']:7.2f} / "
            f"{r['hbm_gib']:<5.0f} {r['tflop_per_chip']:7.3f} {r['roofline_s']:8.4f} "
            f"{r['bound']:>7s} {r['mfu_bound']:6.1%}{flag}")
    lines.append("GiB per chip; TFLOP per chip a call (model FLOPs); est s = roofline estimate "
                 "max(executed FLOPs / peak, HBM bytes / bandwidth) from the chip's published "
                 f"figures ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                 f"{chip.hbm_bw / 1e9:.0f} GB/s, {chip.hbm_bytes / 2**30:.0f} GiB)")
    lines.append("collectives in the compiled HLO (ops, MiB of results; a loop body counted "
                 "once: layers under scan, microbatches, decode steps):")
    for r in rows:
        if r["collectives"]:
            totals = aot.collective_totals(r["collectives"])
            lines.append(f"  {r['program']}: " + ", ".join(
                f"{k} {n} / {b / 2**20:.1f}" for k, (n, b) in sorted(totals.items())))
            for o in r["collectives"] if each else ():
                lines.append(f"      {o['kind']:18s} {o['shape']:32s} {o['op'][-100:]}")
    notes = sorted({r["note"] for r in rows if r["note"]})
    lines += [f"note: {n}" for n in notes] + failures
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m launch.compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("config", help="configs/X.py or configs/X.py:ARG")
    p.add_argument("--topology", required=True, help="v5p-64, v4-16, v5e-16, v5p:2x4x4 ...")
    p.add_argument("--only", default="", help="compile only programs whose name starts with "
                   "one of these (comma separated: rl_step,decode,...)")
    p.add_argument("--json", default="", help="also write the rows to this file (with every "
                   "collective: kind, shape, bytes, the jax operation it serves)")
    p.add_argument("--collectives", action="store_true",
                   help="list every collective of each program, with the operation it serves")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    _use_libtpu()
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        print(f"launch.compile needs libtpu: make setup installs it, or run\n    .venv/bin/pip "
              f"install --no-deps --target {LIBTPU_DIR.relative_to(REPO)} {LIBTPU}",
              file=sys.stderr)
        return 2
    from absl import flags
    from ml_collections import config_flags
    from tarl_jax import aot, config_check
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", args.config, "config", flag_values=fv)
    try:
        fv(["launch.compile", *rest])
        topo = aot.parse_topology(args.topology)
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    config = fv.config
    try:
        config_check.check(config, here=False)   # data and endpoints are the pod's
    except config_check.ConfigError as e:
        print("error: " + "\n       ".join(f"--config.{l}" for l in str(e).splitlines()),
              file=sys.stderr)
        return 2
    model_cfg, audio_cfg = model_shapes(config)
    devs = aot.devices(topo)
    plan = aot.Plan(config, model_cfg, audio_cfg, devs, topo.hosts)
    print(f"{args.config} on {topo.name}: {topo.chips} {topo.chip.name} chips "
          f"({'x'.join(map(str, topo.shape))}), {topo.hosts} host(s), mesh "
          f"{dict(plan.mesh.shape)}; model {model_cfg.num_layers} layers x {model_cfg.hidden_size}"
          f" ({config.model.dtype}, remat {model_cfg.remat}, attn_chunk {model_cfg.attn_chunk})",
          flush=True)
    only = tuple(filter(None, args.only.split(",")))
    results, failures = [], [f"problem: {m}" for m in aot.checks(config, topo)]
    for prog in plan.programs():
        if only and not prog.name.startswith(only):
            continue
        print(f"  compiling {prog.name} ...", flush=True)
        r = aot.compile_one(prog, topo.chip)
        results.append(r)
        if not r.fits:
            over = (r.needed - topo.chip.hbm_bytes) / 2**30
            failures.append(f"DOES NOT FIT: {prog.name} needs {r.needed / 2**30:.1f} GiB a chip, "
                            f"{over:.1f} GiB over the {topo.chip.hbm_bytes / 2**30:.0f} GiB of a "
                            f"{topo.chip.name} chip; try {aot.advice(r)}")
    print(report(results, topo.chip, failures, args.collectives), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "config": args.config, "overrides": rest, "topology": topo.name, "chips": topo.chips,
            "hosts": topo.hosts, "mesh": dict(plan.mesh.shape), "state_gib_per_chip":
            plan.state_bytes() / 2**30, "programs": [r.row(topo.chip) for r in results],
            "problems": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
