"""A corrupt checkpoint is never restored: every array's checksums are written at save and
verified at restore; a checkpoint that fails (or cannot be read at all) is moved aside, named in
the log, and the newest good one is restored instead."""
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarl_jax.rl import checkpoint as ckpt_lib


def make_state(seed):
    rng = np.random.default_rng(seed)
    return {"step": jnp.int32(seed),
            "params": {"w": jnp.asarray(rng.normal(size=(128, 256)), jnp.float32),
                       "e": jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16),
                       "on": jnp.asarray(rng.random(16) < 0.5)}}


def saved(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    states = {s: make_state(s) for s in (1, 2)}
    for s, st in states.items():
        ck.save(s, st, {"history": [s]}, force=True)
    ck.close()
    return states


def biggest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()
             and "ocdbt.process" in str(p) and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def flip_bytes(step_dir):
    path = biggest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 4096, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))                 # same size


def truncate(step_dir):
    path = biggest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{not json")


def silent_change(step_dir):
    """Arrays that read back without error but are not what was saved (the case tensorstore's
    own checks miss: the run once resumed from such a file and trained on to NaN). Stand-in:
    the recorded checksum of one array no longer matches what reads back."""
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["checksums"]["params/w"][1] ^= 1
    path.write_text(json.dumps(meta))


def drop_manifest(step_dir):
    for path in (step_dir / "state").rglob("manifest.ocdbt"):
        path.unlink()


@pytest.mark.parametrize("corrupt", [flip_bytes, truncate, garbage_meta, drop_manifest, silent_change],
                         ids=lambda f: f.__name__)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_good_one(tmp_path, caplog, corrupt):
    states = saved(tmp_path)
    corrupt(tmp_path / "checkpoints" / "2")
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    abstract = ckpt_lib.abstract_like(states[1])
    with caplog.at_level(logging.ERROR, logger="tarl_jax"):
        state, meta = ck.restore(abstract)
    assert meta == {"history": [1]}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "checkpoints/2 is corrupt" in caplog.text
    assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()
    assert ck.latest_step() == 1
    ck.save(2, states[2], {"history": [1, 2]}, force=True)   # the run goes on past it
    ck.close()
    state, meta = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).restore(abstract)
    assert meta == {"history": [1, 2]} and int(state["step"]) == 2


def test_a_checkpoint_missing_only_its_descriptive_metadata_restores_verified(tmp_path):
    """state/_METADATA describes the tree; the restore target gives it too, and the checksums
    prove the arrays whole: no reason to throw the newest checkpoint away."""
    states = saved(tmp_path)
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    state, meta = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).restore(
        ckpt_lib.abstract_like(states[2]))
    assert meta == {"history": [2]}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checksums_see_one_flipped_bit_and_a_swap():
    state = make_state(0)
    base = ckpt_lib.checksums(state)
    w = np.asarray(state["params"]["w"]).copy()
    bits = w.view(np.uint32)
    bits[3, 7] ^= 1 << 12
    flipped = ckpt_lib.checksums({**state, "params": {**state["params"], "w": jnp.asarray(w)}})
    assert flipped["params/w"] != base["params/w"] and flipped["params/e"] == base["params/e"]
    w = np.asarray(state["params"]["w"]).copy()
    w[0, 0], w[5, 9] = w[5, 9], w[0, 0]
    swapped = ckpt_lib.checksums({**state, "params": {**state["params"], "w": jnp.asarray(w)}})
    assert swapped["params/w"][0] == base["params/w"][0]      # the plain sum cannot see it
    assert swapped["params/w"][1] != base["params/w"][1]      # the position-weighted one does


def test_checksums_do_not_depend_on_sharding():
    """What a host computes at save must equal what a differently sharded restore computes."""
    state = make_state(3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    placed = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert ckpt_lib.checksums(placed) == ckpt_lib.checksums(jax.device_get(state))
