"""Tokens/s of our GRPO update vs google-tunix's, and our step on 1 vs 8 simulated devices.

    python -m tarl_jax.bench.train_step [--shapes tiny,27m] [--rows 8] [--prompt 128]
        [--completion 128] [--meshes data=8,fsdp=8,fsdp=4+tensor=2] [--rounds 5]

Part 1, the update only (no sampling): one already-sampled GRPO batch of --rows rows
(--group samples per prompt), each --prompt prompt tokens + --completion completion tokens
(completion lengths drawn in [completion/2, completion], the rest padding), float32, the same
Qwen3 shape and the same weights in both, adamw (clip 1.0, lr 1e-6, no weight decay), clipped
GRPO loss (eps 0.2) + k3 KL to the reference (0.04), sequence-mean aggregation, entropy logged.
Ours: `rl.step.jit_train_step` in this process on a 1-device mesh. tunix 0.1.7:
`tarl_jax/bench/tunix_grpo.py` (what exactly it times is in its docstring) in a subprocess with
the python of --tunix_venv, skipped with the command that creates that venv when it is missing.
The first step's loss and gradient norm of both are printed: equal values show both compute the
same update.

Timing: after a first (compiling) step each, the peers take turns, one step each per round for
--rounds rounds, so that load from other processes on a shared machine falls on both alike;
each reports its best wall time (tokens/s = rows * (prompt + completion) / that) and its best
process CPU time per step (all threads; less sensitive to being descheduled).

Part 2: our step (same batch recipe, --mesh_shape, --mesh_rows rows) in one subprocess per mesh
of --meshes ('+' joins axes), each with XLA_FLAGS=--xla_force_host_platform_device_count=N,
against one device, timed in turns as above. Simulated devices share this machine's cores, so on
2 cores they measure the cost of the partitioned program (collectives, smaller kernels), not a
speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from tarl_jax import aot, sharding
from tarl_jax.bench import limits
from tarl_jax.models import presets, qwen
from tarl_jax.rl import losses, pack
from tarl_jax.rl import step as S

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUNIX_VENV = os.path.join(REPO, ".venv-tunix")
TUNIX_SETUP = "python3.11 -m venv .venv-tunix && .venv-tunix/bin/pip install google-tunix==0.1.7"
PAD_ID, EOS_ID = 0, 1

# rope_theta 1e6 in every shape: tunix's Qwen3 rotates with 1e6 whatever its config says.
SHAPES = {
    "tiny": dataclasses.replace(presets.get("tiny"), rope_theta=1e6),
    "27m": qwen.DecoderConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                              num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                              rope_theta=1e6, qk_norm=True, tie_embeddings=True,
                              model_type="qwen3"),
}
LR, CLIP_NORM, EPSILON, KL_COEF = 1e-6, 1.0, 0.2, 0.04
STEP_CFG = S.StepConfig(loss=losses.LossConfig(policy_loss="ppo", clip_low=EPSILON,
                                               clip_high=EPSILON, agg="seq_mean",
                                               kl_coef=KL_COEF, kl_estimator="k3"),
                        logprob_chunk=1024)


def shape(name: str) -> qwen.DecoderConfig:
    if name not in SHAPES:
        raise KeyError(f"shape {name!r} unknown; choose from {sorted(SHAPES)}")
    return SHAPES[name]


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4+tensor=2' -> {'fsdp': 4, 'tensor': 2}."""
    out = {}
    for part in text.split("+"):
        axis, eq, size = part.partition("=")
        if not eq or not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh {text!r}: write axis=size joined by '+', e.g. fsdp=4+tensor=2")
        out[axis] = int(size)
    sharding.mesh_shape(out, math.prod(out.values()))  # unknown axis names fail here
    return out


def make_batch(cfg, rows: int, prompt: int, completion: int, group: int, seed: int = 0):
    """(ours: pack.py-layout arrays [rows, prompt + completion], tunix: TrainExample arrays).

    Every row is one episode: prompt tokens, then a completion of random length padded with
    PAD_ID (segment 0 in ours, so attention skips it as tunix's pad mask does). Rollout and
    reference log-probs are log(1/V) plus noise: near a fresh model's, and independent of it,
    so the first step's loss depends on the model's log-probs and checks both forwards.
    """
    if rows % group:
        raise ValueError(f"rows={rows} must be a multiple of group={group}")
    rng = np.random.default_rng(seed)
    t = prompt + completion
    lengths = rng.integers(completion // 2, completion + 1, rows)
    comp_mask = np.arange(completion)[None] < lengths[:, None]
    prompt_ids = rng.integers(2, cfg.vocab_size, (rows, prompt)).astype(np.int32)
    comp_ids = np.where(comp_mask, rng.integers(2, cfg.vocab_size, (rows, completion)),
                        PAD_ID).astype(np.int32)
    rewards = rng.normal(size=(rows // group, group))
    adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6))
    adv = adv.reshape(-1).astype(np.float32)
    old, ref = (np.where(comp_mask, -np.log(cfg.vocab_size) + 0.1 * rng.normal(size=comp_mask.shape),
                         0).astype(np.float32) for _ in range(2))

    tokens = np.concatenate([prompt_ids, comp_ids], 1)
    loss_mask = np.zeros((rows, t), bool)
    loss_mask[:, prompt - 1:t - 1] = comp_mask  # position p scores token p + 1
    at_loss = lambda x: np.pad(x, ((0, 0), (prompt - 1, 1)))  # noqa: E731  completion -> [rows, t]
    ours = dict(tokens=tokens, positions=np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
                segment_ids=np.concatenate([np.ones((rows, prompt), np.int32), comp_mask.astype(np.int32)], 1),
                targets=np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], 1),
                loss_mask=loss_mask, advantages=np.where(loss_mask, adv[:, None], 0).astype(np.float32),
                logprobs=at_loss(old), ref_logprobs=at_loss(ref))
    ours["policy_index"] = pack.policy_index(loss_mask)   # as the trainer's batches carry
    theirs = dict(prompt_ids=prompt_ids, completion_ids=comp_ids, completion_mask=comp_mask,
                  advantages=adv, old_logps=old, ref_logps=ref)
    return ours, theirs


class Ours:
    """Our jitted step on a mesh of the first devices, compiled by a first step (`first_s`, and
    its loss and gradient norm); `step()` runs one more and returns its wall and CPU seconds."""

    def __init__(self, cfg, params, batch: dict, mesh_spec: dict):
        mesh = sharding.make_mesh(mesh_spec, jax.devices()[:math.prod(mesh_spec.values())])
        opt = S.make_optimizer(LR, clip_norm=CLIP_NORM)
        sh = S.state_shardings(cfg, opt, False, mesh)
        self.state = S.init_state(params, opt, cfg, False, sh)
        keys = S.BATCH_KEYS + S.GATHER_KEYS
        self.batch = S.device_batch(batch, keys, mesh)
        start = time.perf_counter()
        # Compiled ahead, so XLA's own FLOP count of the program is at hand (bench.limits)
        self.fn = S.jit_train_step(cfg, STEP_CFG, opt, mesh, sh, keys).lower(
            self.state, self.batch, jax.random.key(0)).compile()
        cost = self.fn.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        metrics = self._run()
        self.ready = {"first_s": time.perf_counter() - start, "loss": float(metrics["loss"]),
                      "grad_norm": float(metrics["grad_norm"]),
                      "xla_flops": float((cost or {}).get("flops", math.nan))}

    def _run(self):
        self.state, metrics = self.fn(self.state, self.batch, jax.random.key(0))
        return jax.block_until_ready((self.state, metrics))[1]

    def step(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        self._run()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    def close(self):
        pass


class Worker:
    """A peer in a subprocess speaking tunix_grpo.py's protocol: one JSON line once compiled,
    then one timed step (a JSON line) per line we send."""

    def __init__(self, cmd: list[str], env: dict):
        self.log = tempfile.TemporaryFile("w+")  # stderr: a full pipe would block the child
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=REPO)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"{' '.join(self.proc.args[:3])} ... exited {self.proc.returncode}:\n"
                               f"{self.log.read()[-4000:]}")
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def race(peers: list, rounds: int) -> list[dict]:
    """Alternate one step of each peer per round (rotating who goes first), so every peer sees
    the same load on a shared machine; each gets its best wall and CPU seconds."""
    best = [{"wall": math.inf, "cpu": math.inf} for _ in peers]
    for r in range(rounds):
        for i in [(r + k) % len(peers) for k in range(len(peers))]:
            t = peers[i].step()
            best[i] = {k: min(best[i][k], t[k]) for k in best[i]}
    return [dict(p.ready, step_s=b["wall"], cpu_s=b["cpu"], compile_s=p.ready["first_s"] - b["wall"])
            for p, b in zip(peers, best)]


def tunix_worker(cfg, params, theirs: dict, group: int, python: str, tmp: str) -> Worker:
    flat = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(tmp, "params.npz"), **flat)
    np.savez(os.path.join(tmp, "batch.npz"), **theirs)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(cfg), "lr": LR, "clip_norm": CLIP_NORM,
                   "epsilon": EPSILON, "kl_coef": KL_COEF, "group": group, "pad_id": PAD_ID,
                   "eos_id": EOS_ID}, f)
    return Worker([python, os.path.join(REPO, "tarl_jax", "bench", "tunix_grpo.py"), tmp],
                  dict(os.environ, JAX_PLATFORMS="cpu"))


def limits_table(rows: list[tuple], lim) -> None:
    """Our step against this machine's matmul rate: (shape, cfg, rows, t, scored, result)."""
    print(f"\n## Our update against this machine's limits ({lim.line()})\n")
    print("| shape | model GFLOP a step (6ND + attention) | executed GFLOP (analytic / XLA) "
          "| best step s | model GFLOP/s | of the float32 matmul rate |")
    print("|---|---|---|---|---|---|")
    for name, cfg, n, t, scored, r in rows:
        model, executed = aot.train_flops(cfg, n, t, scored)
        xla = r.get("xla_flops", math.nan)
        print(f"| {name} | {model / 1e9:.3g} | {executed / 1e9:.3g} / {xla / 1e9:.3g} | "
              f"{r['step_s']:.3f} | {model / r['step_s'] / 1e9:.3g} | "
              f"{model / r['step_s'] / lim.matmul_f32:.1%} |", flush=True)


def compare(args) -> None:
    lim = limits.measure() if args.limits else None
    mine = []
    python = os.path.join(args.tunix_venv, "bin", "python")
    have_tunix = os.path.exists(python)
    if not have_tunix:
        print(f"tunix part skipped: no {python}. Create the venv (repo root) with:\n    {TUNIX_SETUP}")
    print(f"\n## GRPO update: tarl_jax vs tunix 0.1.7 (jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, float32, best of {args.rounds} alternated steps)\n")
    print("| shape | params | rows x (prompt + completion) | tarl_jax tok/s | tunix tok/s | ratio "
          "| CPU s per step (ours / tunix) | CPU ratio | compile s (ours / tunix) "
          "| first-step loss (ours / tunix) | grad norm (ours / tunix) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        cfg = shape(name)
        params = qwen.init_params(cfg, jax.random.key(0))
        ours_b, theirs_b = make_batch(cfg, args.rows, args.prompt, args.completion, args.group)
        tokens = args.rows * (args.prompt + args.completion)
        with tempfile.TemporaryDirectory() as tmp:
            peers = [Ours(cfg, params, ours_b, {"data": 1})]
            if have_tunix:
                peers.append(tunix_worker(cfg, params, theirs_b, args.group, python, tmp))
            try:
                res = race(peers, args.rounds)
            finally:
                for p in peers:
                    p.close()
        o, t = res[0], (res[1] if have_tunix else None)
        mine.append((name, cfg, args.rows, args.prompt + args.completion,
                     ours_b["policy_index"].shape[1], o))
        pair = lambda key, fmt: f"{o[key]:{fmt}} / " + (f"{t[key]:{fmt}}" if t else "-")  # noqa: E731
        print(f"| {name} | {qwen.num_params(params) / 1e6:.2f}M | {args.rows} x ({args.prompt} + "
              f"{args.completion}) | {tokens / o['step_s']:.0f} | "
              + (f"{tokens / t['step_s']:.0f} | {t['step_s'] / o['step_s']:.2f}x" if t else "skipped | -")
              + f" | {pair('cpu_s', '.3f')} | "
              + (f"{t['cpu_s'] / o['cpu_s']:.2f}x" if t else "-")
              + f" | {pair('compile_s', '.1f')} | {pair('loss', '.6f')} | "
              f"{pair('grad_norm', '.5g')} |", flush=True)
    if lim:
        limits_table(mine, lim)


def worker(args) -> None:
    """One mesh, in a process whose device count the parent set: the step protocol on stdio."""
    cfg = shape(args.mesh_shape)
    params = qwen.init_params(cfg, jax.random.key(0))
    batch, _ = make_batch(cfg, args.mesh_rows, args.prompt, args.completion, args.group)
    ours = Ours(cfg, params, batch, parse_mesh(args.worker))
    print(json.dumps(ours.ready), flush=True)
    for _ in sys.stdin:
        print(json.dumps(ours.step()), flush=True)


def scaling(args) -> None:
    meshes = ["data=1"] + args.meshes.split(",")
    print(f"\n## Our step on simulated CPU devices: shape {args.mesh_shape}, {args.mesh_rows} x "
          f"({args.prompt} + {args.completion}) tokens, {os.cpu_count()} cores shared by all "
          f"devices, best of {args.rounds} alternated steps\n")
    print("| mesh | devices | step s | tok/s | step time vs 1 device | CPU s per step | compile s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    peers = []
    try:
        for text in meshes:
            n = math.prod(parse_mesh(text).values())
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
            peers.append(Worker(
                [sys.executable, "-m", "tarl_jax.bench.train_step", "--worker", text,
                 "--mesh_shape", args.mesh_shape, "--mesh_rows", str(args.mesh_rows),
                 "--prompt", str(args.prompt), "--completion", str(args.completion),
                 "--group", str(args.group)], env))
        res = race(peers, args.rounds)
    finally:
        for p in peers:
            p.close()
    tokens = args.mesh_rows * (args.prompt + args.completion)
    for text, r in zip(meshes, res):
        print(f"| {text.replace('+', ' x ')} | {math.prod(parse_mesh(text).values())} | "
              f"{r['step_s']:.3f} | {tokens / r['step_s']:.0f} | {r['step_s'] / res[0]['step_s']:.2f}x | "
              f"{r['cpu_s']:.3f} | {r['compile_s']:.1f} | {r['loss']:.6f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,27m", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's G)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="timed steps of each peer, alternated")
    ap.add_argument("--tunix_venv", default=TUNIX_VENV)
    ap.add_argument("--meshes", default="data=8,fsdp=8,fsdp=4+tensor=2",
                    help="comma-separated meshes for part 2 ('' skips it)")
    ap.add_argument("--mesh_shape", default="tiny")
    ap.add_argument("--mesh_rows", type=int, default=16)
    ap.add_argument("--skip_compare", action="store_true", help="part 2 only")
    ap.add_argument("--no-limits", dest="limits", action="store_false",
                    help="skip measuring this machine's matmul rate (bench.limits) and the "
                         "fraction of it our step reaches")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for m in filter(None, args.meshes.split(",")):  # bad arguments fail before any compiling
        parse_mesh(m)
    for name in args.shapes.split(",") + [args.mesh_shape]:
        shape(name)
    if args.worker:
        return worker(args)
    if not args.skip_compare:
        compare(args)
    if args.meshes:
        scaling(args)


if __name__ == "__main__":
    main()
