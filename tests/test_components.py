"""One owner per rule: where a domain's data lives (v1 and tau2 layouts, read the same way by the
database, the trainer's world and the curriculum), and which tokenizer and weights a model
section names (trainer, main, server and benchmarks all call components.load_model)."""
import json
import pathlib

import jax
import numpy as np
import pytest

from tarl_jax import components, configlib, sharding
from tarl_jax.models import presets, qwen
from tarl_jax.models import tokenizer as tokenizer_lib
from tarl_jax.rl import checkpoint, curriculum
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.tasks import find_data_dir, load_tasks

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def v1_task(i, user):
    return {"user_id": user, "instruction": f"task {i}",
            "actions": [{"name": "get_user_details", "kwargs": {"user_id": user}}], "outputs": []}


def tau2_task(i, user):
    return {"id": f"t{i}", "user_scenario": {"instructions": f"Your user id is {user}."},
            "evaluation_criteria": {"actions": [{"name": "get_user_details",
                                                 "arguments": {"user_id": user}}]}}


@pytest.fixture
def layouts(tmp_path):
    """The same synthetic database in both layouts, under a root as tau-bench ships them."""
    tables, tasks = synth.generate(synth.SynthConfig(num_tasks=6))
    users = sorted(tables["users"])
    v1 = tmp_path / "root" / "v1" / "retail"
    synth.write_json(v1, tables, tasks)
    (v1 / "tasks_train.json").write_text(json.dumps([v1_task(i, users[i]) for i in range(4)]))
    (v1 / "tasks_test.json").write_text(json.dumps([v1_task(i, users[i]) for i in range(4, 6)]))
    tau2 = tmp_path / "root" / "tau2" / "retail"
    tau2.mkdir(parents=True)
    # tau2's records carry their own key (v1's users do not).
    db = dict(tables, users={k: dict(u, user_id=k) for k, u in tables["users"].items()})
    (tau2 / "db.json").write_text(json.dumps(db))
    (tau2 / "policy.md").write_text("policy")
    (tau2 / "tasks.json").write_text(json.dumps([tau2_task(i, users[i]) for i in range(6)]))
    (tau2 / "split_tasks.json").write_text(json.dumps({"train": ["t5", "t0", "t1"],
                                                       "test": ["t2", "t3"]}))
    return tmp_path / "root", v1, tau2, users


def test_one_rule_finds_both_layouts(layouts):
    root, v1, tau2, users = layouts
    assert find_data_dir(root, "retail") == find_data_dir(v1, "retail")   # a root: v1 first
    found = find_data_dir(v1, "retail")
    assert found.flavor == "v1" and found.path == v1.resolve()
    splits = found.load_splits()
    assert [t.user_id for t in splits["train"]] == users[:4]
    assert [t.user_id for t in splits["test"]] == users[4:6]
    found = find_data_dir(tau2, "retail")
    assert found.flavor == "tau2"
    splits = found.load_splits()
    assert [t.task_id for t in splits["train"]] == ["t5", "t0", "t1"]   # the split file's order
    assert [t.user_id for t in splits["test"]] == users[2:4]
    # The database reads the same records through either layout.
    a, b = World.from_dir("retail", root), World.from_dir("retail", tau2)
    assert (a.flavor, b.flavor) == ("v1", "tau2")
    assert (json.loads(a.initial_text("users", users[0]))["orders"]
            == json.loads(b.initial_text("users", users[0]))["orders"])


def test_errors_name_what_is_missing(layouts, tmp_path):
    _, v1, tau2, _ = layouts
    with pytest.raises(FileNotFoundError, match="no tau-bench 'retail' data"):
        find_data_dir(tmp_path / "nothing", "retail")
    (tau2 / "split_tasks.json").unlink()
    with pytest.raises(FileNotFoundError, match="split_tasks.json"):
        find_data_dir(tau2, "retail").task_files
    (v1 / "tasks_test.json").unlink()
    with pytest.raises(FileNotFoundError, match="tasks_test.json"):
        find_data_dir(v1, "retail").load_splits()


@pytest.mark.parametrize("flavor", ["v1", "tau2"])
def test_world_and_curriculum_read_the_same_tasks(layouts, flavor):
    root, v1, tau2, _ = layouts
    config = configlib.load(TINY, "runlocal")
    config.world.source, config.world.data_dir = "dir", str(v1 if flavor == "v1" else tau2)
    config.world.eval_tasks = 1
    world = components.build_world(config)
    splits = find_data_dir(config.world.data_dir, "retail").load_splits()
    assert [t.task_id for t in world.train] == [t.task_id for t in splits["train"]]
    assert [t.task_id for t in world.eval] == [splits["test"][0].task_id]
    tool = curriculum.source_configs(config)["tool"]
    assert tool.spec["dir"] == str(find_data_dir(config.world.data_dir, "retail").path)
    built = curriculum.builder("tool", tool, root.parent / "tfds")._splits()
    assert [t.task_id for t in built["train"]] == [t.task_id for t in world.train]


def test_the_shared_tau_bench_root_in_both_layouts(taubench_dir):
    v1 = find_data_dir(taubench_dir, "retail")
    assert v1.flavor == "v1" and v1.path == (taubench_dir / "v1" / "retail").resolve()
    assert len(v1.load_splits()["test"]) == len(load_tasks(v1.path / "tasks_test.json", "retail"))
    tau2 = find_data_dir(taubench_dir / "tau2" / "retail", "retail")
    ids = json.loads((tau2.path / "split_tasks.json").read_text())
    splits = tau2.load_splits()
    assert [t.task_id for t in splits["train"]] == [str(i) for i in ids["train"]]
    assert len(splits["test"]) == len(ids["test"])


def test_tokenizer_rule():
    tiny = tokenizer_lib.tiny_tokenizer_dir()
    assert components.tokenizer_dir("tiny") == tiny
    assert components.tokenizer_dir("", "") == tiny
    assert components.tokenizer_dir("", "/no/such/dir") == tiny            # no tokenizer.json there
    assert components.tokenizer_dir("", str(tiny)) == str(tiny)            # the hf dir's own
    assert components.tokenizer_dir("hf", "/x") == "/x"
    with pytest.raises(ValueError, match="hf_dir"):
        components.tokenizer_dir("hf", "")


def test_load_model_from_a_preset_and_from_a_trainer_checkpoint(tmp_path):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tok, cfg, params = components.load_model({"preset": "micro"}, seed=3)
    assert cfg == presets.get("micro") and tok.vocab_size <= cfg.vocab_size
    want = jax.jit(lambda k: qwen.init_params(cfg, k))(jax.random.key(3))
    assert jax.tree.all(jax.tree.map(np.array_equal, params, want))
    ckpt = checkpoint.Checkpointer.for_workdir(tmp_path)
    ckpt.save(5, {"step": np.int32(5), "params": {"policy": params}}, {"history": []}, force=True)
    ckpt.close()
    assert checkpoint.committed_steps(tmp_path) == [5]
    _, _, restored = components.load_model({"preset": "micro", "orbax": str(tmp_path)}, mesh)
    assert jax.tree.all(jax.tree.map(np.array_equal, restored, params))
    with pytest.raises(ValueError, match="vocab"):
        components.load_model({"preset": "micro", "tokenizer": "qwen3"})
