"""Mesh construction, rules as data, and sharded forward/gradient == single device."""
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from tarl_jax import sharding


def test_mesh_shape_resolution():
    assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert sharding.mesh_shape({"fsdp": 2, "tensor": -1}, 8) == (1, 2, 4)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape({"data": 2, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "tensor": -1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 2}, 8)


def test_rules_from_config_validates():
    rules = sharding.rules_from_config([("batch", ["data", "fsdp"]), ("mlp", "tensor")])
    assert rules == (("batch", ("data", "fsdp")), ("mlp", "tensor"))
    with pytest.raises(ValueError, match="mesh axis must be one of"):
        sharding.rules_from_config([("mlp", "model")])


def test_single_device_mesh():
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from tarl_jax import sharding
    from tarl_jax.models import qwen
    assert len(jax.devices()) == 8
    cfg = qwen.DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=8, num_kv_heads=4, head_dim=8, qk_norm=True, scan_layers=SCAN)
    params = qwen.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 128)
    positions = jnp.broadcast_to(jnp.arange(12), (4, 12))
    model = qwen.Decoder(cfg)

    def loss(p, tokens, positions):
        h, _ = model.apply({"params": p}, tokens, positions)
        logits = model.apply({"params": p}, h, method=qwen.Decoder.logits)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    def step(p, tokens, positions):
        l, g = jax.value_and_grad(loss)(p, tokens, positions)
        return l, jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    ref_loss, ref_params = jax.jit(step)(*jax.device_put((params, tokens, positions), jax.devices()[0]))

    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    pshard = sharding.logical_sharding(qwen.logical_axes(cfg), mesh)
    bshard = sharding.spec(mesh, "batch", "length")
    p8 = sharding.reshard(jax.tree.map(np.asarray, params), pshard)
    assert p8["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    with mesh:
        sh_loss, sh_params = jax.jit(step, in_shardings=(pshard, bshard, bshard),
                                     out_shardings=(sharding.replicated(mesh), pshard))(
            p8, sharding.reshard(np.asarray(tokens), bshard), sharding.reshard(np.asarray(positions), bshard))
    d_loss = abs(float(sh_loss) - float(ref_loss))
    d_par = max(float(jnp.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(sh_params), jax.tree.leaves(ref_params)))
    print("DIFF", d_loss, d_par)
    assert d_loss < 1e-5 and d_par < 1e-5, (d_loss, d_par)
""")


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_step_equals_single_device(scan):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("SCAN", str(scan))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DIFF" in out.stdout
