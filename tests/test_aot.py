"""launch.compile: a config's programs compiled ahead of time for a TPU topology on this CPU
machine (libtpu describes the chips). Reported per-chip bytes are checked against the parameter
count and the mesh; a model too large for its chip is refused with the program and the knobs."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tarl_jax import aot, components, sharding
from tarl_jax.models import presets, qwen
from tarl_jax.rl import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU = REPO / ".venv" / "libtpu"


@pytest.fixture(scope="module")
def libtpu():
    if not (LIBTPU / "libtpu").is_dir():
        msg = f"libtpu is not installed in {LIBTPU} (make setup installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)


def compile_run(tmp_path, *argv, timeout=600):
    out = tmp_path / "fit.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-m", "launch.compile", *argv, f"--json={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    fit = json.loads(out.read_text()) if out.exists() else None
    return proc, fit


def test_topology_names_give_cloud_tpu_slice_shapes():
    got = {n: (aot.parse_topology(n).shape, aot.parse_topology(n).hosts)
           for n in ("v5p-64", "v4-16", "v4-8", "v5p-128", "v5e-16", "v5e-8", "v6e-4", "v5p:2x4x4")}
    assert got == {"v5p-64": ((2, 4, 4), 8), "v4-16": ((2, 2, 2), 2), "v4-8": ((2, 2, 1), 1),
                   "v5p-128": ((4, 4, 4), 16), "v5e-16": ((4, 4), 4), "v5e-8": ((2, 4), 1),
                   "v6e-4": ((2, 2), 1), "v5p:2x4x4": ((2, 4, 4), 8)}
    for bad, why in (("v5p-63", "TensorCores"), ("v9-8", "unknown"), ("v5p:2x4", "3 dimensions"),
                     ("tpu", "accelerator type")):
        with pytest.raises(ValueError, match=why):
            aot.parse_topology(bad)


@pytest.mark.parametrize("chunk", [0, 16])
def test_train_flops_count_matches_xla_on_a_loop_free_program(chunk):
    """The analytic count the roofline uses equals XLA's own count where XLA can count (no
    scanned layers, one microbatch: cost_analysis counts a loop body once), on a model wide
    enough that matmuls dominate, as they do at real sizes."""
    cfg = qwen.DecoderConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True,
                             attn_chunk=chunk)   # 16: 4 query blocks, unrolled (no loop)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt = step_lib.make_optimizer(1e-3)
    keys = step_lib.BATCH_KEYS
    sh = step_lib.state_shardings(cfg, opt, False, mesh)
    fn = step_lib.jit_train_step(cfg, step_lib.StepConfig(logprob_chunk=cfg.vocab_size), opt,
                                 mesh, sh, keys)
    rows, t = 2, 64
    state = jax.eval_shape(lambda: step_lib.init_state(
        qwen.init_params(cfg, jax.random.key(0)), opt, cfg, False, sh))
    batch = aot.batch_shapes(keys, rows, t, t, cfg.hidden_size)
    xla = fn.lower(state, batch, jax.random.key(0)).compile().cost_analysis()["flops"]
    model, executed = aot.train_flops(cfg, rows, t, t)
    assert model < executed        # the whole square is computed; causal attention needs half
    # XLA adds the elementwise work (norms, softmax, Adam) the count leaves out: a few percent.
    assert 1.0 <= xla / executed < 1.08, xla / executed


def test_reported_bytes_follow_the_parameter_count_and_fsdp(tmp_path, libtpu):
    """The RL step's argument bytes a chip are the train state (params + Adam's two moments,
    float32) plus the chip's slice of the batch; fsdp=2 halves the state. The model's widths are
    multiples of 128, so TPU's (8, 128) tiles pad nothing but its few 1-D norm scales."""
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(qwen.DecoderConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=128, qk_norm=True, tie_embeddings=True).to_hf()))
    only = ["--only=rl_step", "--config.pack.rows=(4,)", "--config.pack.seq_lens=(256,)",
            f"--config.model.preset={shape}"]
    base, fit = compile_run(tmp_path, "configs/tiny.py:runlocal", "--topology=v5e-4", *only)
    assert base.returncode == 0, base.stdout[-2000:] + base.stderr[-2000:]
    half, fit2 = compile_run(tmp_path, "configs/tiny.py:runlocal", "--topology=v5e-4", *only,
                             "--config.mesh.data=2", "--config.mesh.fsdp=2")
    assert half.returncode == 0, half.stdout[-2000:] + half.stderr[-2000:]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
        lambda: qwen.init_params(components.model_shape(str(shape)), jax.random.key(0)))))
    state = 3 * 4 * n                                   # params, mu, nu in float32
    row = 256 * (4 * 4 + 1 + 3 * 4) + 256 * 4           # int32 x4, bool, f32 x3; policy_index
    slack = 64 * 1024                                   # tiles of the 1-D norm scales, counters
    (prog,) = fit["programs"]
    (prog2,) = fit2["programs"]
    assert prog["program"] == "rl_step 4x256" and prog["fits"] and prog2["fits"]
    got = prog["argument_gib"] * 2**30
    # data=4: every chip holds the whole state and one of the 4 rows.
    assert state + row <= got <= state + row + slack, (got, state + row)
    got2 = prog2["argument_gib"] * 2**30
    # data=2 x fsdp=2: every parameter has an embed axis cut in two (q/k norms excepted); the
    # batch's rows still spread over both axes, one a chip.
    assert state / 2 + row <= got2 <= state / 2 + row + slack, (got2, state / 2 + row)


def test_a_model_too_large_for_its_chip_is_refused_with_the_knobs(tmp_path, libtpu):
    proc, fit = compile_run(
        tmp_path, "configs/tiny.py:runlocal", "--topology=v5e-1", "--only=rl_step",
        "--config.model.preset=qwen3-1.7b", "--config.model.tokenizer=qwen3",
        "--config.model.scan_layers=True", "--config.pack.rows=(1,)",
        "--config.pack.seq_lens=(128,)")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DOES NOT FIT: rl_step 1x128 needs" in proc.stdout
    assert "GiB over the 16 GiB of a v5e chip" in proc.stdout and "fsdp" in proc.stdout
    (prog,) = fit["programs"]
    # 1.7B parameters with Adam in float32 are ~24 GiB before any activation.
    assert not prog["fits"] and prog["total_gib"] > 20


def test_bad_topology_and_config_exit_2(tmp_path, libtpu):
    proc, _ = compile_run(tmp_path, "configs/tiny.py", "--topology=v5p-63")
    assert proc.returncode == 2 and "TensorCores" in proc.stderr
    proc, _ = compile_run(tmp_path, "configs/tiny.py", "--topology=v5e-4", "--config.rl.algo=x")
    assert proc.returncode == 2 and "--config.rl.algo='x'" in proc.stderr


def test_train_step_constrains_activations_to_the_mesh():
    """The models' logical activation constraints reach the compiled step (they are no-ops
    outside `sharding.logical_context`: an 8B step on 32 chips then kept whole microbatches on
    every chip)."""
    cfg = presets.get("micro")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt = step_lib.make_optimizer(1e-3)
    sh = step_lib.state_shardings(cfg, opt, False, mesh)
    fn = step_lib.jit_train_step(cfg, step_lib.StepConfig(microbatches=2), opt, mesh, sh,
                                 step_lib.BATCH_KEYS)
    state = jax.eval_shape(lambda: step_lib.init_state(
        qwen.init_params(cfg, jax.random.key(0)), opt, cfg, False, sh))
    text = fn.lower(state, aot.batch_shapes(step_lib.BATCH_KEYS, 4, 32, 32, cfg.hidden_size),
                    jax.random.key(0)).as_text()
    assert text.count("sdy.sharding_constraint") >= 2 * cfg.num_layers, text.count("sdy.sharding_constraint")


@pytest.mark.parametrize("config", ["configs/qwen3_8b_retail.py", "configs/omni_7b_speech.py",
                                    "configs/omni_7b_speech.py:noise"])
def test_pod_configs_load_and_split_over_the_documented_slice(config):
    """The paper's configs as the README launches them on a v5p-64: valid values, whole tasks
    per host, one row a chip per microbatch (launch.compile's pre-checks; the full compile of
    these 7-8B programs is a README command, minutes each, not a test)."""
    from tarl_jax import config_check, configlib
    path, _, arg = config.partition(":")
    c = configlib.load(str(REPO / path), arg or None)
    config_check.check(c, here=False)
    assert aot.checks(c, aot.parse_topology("v5p-64")) == []
    # 64 chips: a 32-row microbatch leaves half of them idle (set rl.microbatches=2 there).
    assert aot.checks(c, aot.parse_topology("v5p-128"))


def test_ppo_scoring_and_warm_start_programs_compile(tmp_path, libtpu):
    """Every program kind a run executes compiles for a topology: PPO's step (critic keys), the
    scoring pass (reference log-probs, critic values) and the warm start's step."""
    proc, fit = compile_run(tmp_path, "configs/tiny.py:runlocal,algo=ppo", "--topology=v5e-4",
                            "--only=score,warmstart,rl_step", "--config.pack.rows=(4,)",
                            "--config.pack.seq_lens=(256,)", "--config.rl.kl_coef=0.01")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = [p["program"] for p in fit["programs"]]
    assert names == ["rl_step 4x256", "warmstart_step 8x1024", "score 4x256"], names
    assert all(p["fits"] and p["argument_gib"] > 0 for p in fit["programs"])


def test_train_flops_counts_attention_inside_packed_segments_and_the_blocks_sparse_keeps():
    """Model attention FLOPs follow the (query, key) pairs the training mask lets see (packed
    segments, padding), counted from `qwen.attention_mask` itself; with attn_sparse the executed
    attention follows the block pairs a brute-force walk over the mask finds non-empty."""
    rng = np.random.default_rng(0)
    rows, t, chunk = 3, 64, 8
    seg = np.zeros((rows, t), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, t - 4), 3, replace=False))
        seg[r] = np.searchsorted(cuts, np.arange(t), side="right") + 1
        seg[r, t - 1 - r * 3:] = 0                         # padding at the end of some rows
    mask = np.asarray(qwen.attention_mask(np.zeros((rows, t), np.int32), seg, t, False))[:, 0, 0]
    cfg = dataclasses.replace(presets.get("micro"), attn_chunk=chunk, attn_sparse=True)
    body, head = aot.matmul_params(cfg)
    dense = (3 * 2 * (body + head) * rows * t,) * 2        # weights' matmuls, model = executed
    unit = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    model, executed = aot.train_flops(cfg, rows, t, t, seg)
    assert aot.visible_pairs(seg) == mask.sum()
    assert model - dense[0] == 3 * unit * mask.sum()
    blocks = mask.reshape(rows, t // chunk, chunk, t // chunk, chunk).any((2, 4)).sum()
    # forward QK + PV over the kept blocks, backward twice that, QK once more (flash backward)
    assert executed - dense[1] == pytest.approx(3.5 * unit * blocks * chunk * chunk)
    # without segments: half the square needed; the kept blocks are the causal triangle's
    model, executed = aot.train_flops(cfg, rows, t, t)
    n = t // chunk
    assert model - dense[0] == pytest.approx(3 * unit * rows * t * t / 2)
    assert executed - dense[1] == pytest.approx(3.5 * unit * rows * n * (n + 1) / 2 * chunk ** 2)
