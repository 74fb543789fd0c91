"""Logits of `qwen.Decoder` loaded by `hf.load_hf` == transformers' on the same checkpoint."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tarl_jax.models import hf
from tests import hf_models

REPO = pathlib.Path(__file__).resolve().parents[1]
KINDS = sorted(hf_models.CONFIGS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory, reference logits). qwen2 is saved sharded, so the index file is read."""
    out = {}
    for kind in KINDS:
        model = hf_models.build(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path, max_shard_size="40KB" if kind == "qwen2" else "1GB")
        out[kind] = path, hf_models.torch_logits(model)
    assert (out["qwen2"][0] / "model.safetensors.index.json").exists()
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_logits_match_transformers(checkpoints, kind, scan):
    path, ref = checkpoints[kind]
    cfg, params = hf.load_hf(path, overrides=dict(scan_layers=scan))
    assert cfg.model_type == kind and cfg.scan_layers == scan
    assert ("layers" in params) == scan
    diff = np.abs(hf_models.jax_logits(cfg, params) - ref).max()
    assert diff < 1e-4, f"{kind}: max|diff| {diff:.2e}"  # measured ~5e-7 (logits ~1)


_MESH_SCRIPT = r"""
import sys
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from tarl_jax import sharding
from tarl_jax.models import hf
from tests import hf_models

assert jax.device_count() == 8
qwen2_dir, qwen3_dir, ref = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
for scan in (False, True):
    cfg, params = hf.load_hf(qwen2_dir, mesh=mesh, overrides=dict(scan_layers=scan))
    layer = params["layers"]["block"] if scan else params["layers_0"]
    lead = (None,) if scan else ()
    q, k_bias = layer["attn"]["q"], layer["attn"]["k_bias"]
    assert q.sharding.spec == P(*lead, "fsdp", "tensor", None), q.sharding.spec
    assert k_bias.sharding.spec == P(*lead, "tensor", None), k_bias.sharding.spec
    assert params["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
    # [embed 64, heads 8, head_dim 8] -> each device holds 32 x 2 x 8
    assert q.addressable_shards[0].data.shape == (*((2,) if scan else ()), 32, 2, 8)
    diff = np.abs(hf_models.jax_logits(cfg, params) - ref).max()
    assert diff < 1e-4, diff
    print(f"scan={scan} max|diff|={diff:.1e}")
hf.export_hf(params, cfg, sys.argv[4])  # from sharded, stacked params
cfg, params = hf.load_hf(sys.argv[4])
assert np.abs(hf_models.jax_logits(cfg, params) - ref).max() < 1e-4
try:  # qwen3 has 2 kv heads: a 4-way tensor axis cannot split them
    hf.load_hf(qwen3_dir, mesh=mesh)
    raise AssertionError("uneven sharding accepted")
except ValueError as e:
    assert "layers_0/attn/k" in str(e), e
print("ok")
"""


def test_load_into_8_device_mesh(checkpoints, tmp_path):
    ref = tmp_path / "ref.npy"
    np.save(ref, checkpoints["qwen2"][1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, str(checkpoints["qwen2"][0]), str(checkpoints["qwen3"][0]),
         str(ref), str(tmp_path / "export")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stdout + proc.stderr
