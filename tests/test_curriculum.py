"""The curriculum: TFDS builders round-trip every task through array_record, grain batches follow
the schedule, hosts split each step's batch, and get_state/set_state resume the exact sequence.
(The trainer's exact resume after SIGKILL, which stores this state in checkpoints, is
tests/test_trainer.py::test_sigkill_then_resume_reproduces_metrics.)"""
import json
import pathlib

import pytest

from tarl_jax import components, configlib
from tarl_jax.rl import curriculum as C
from tarl_jax.sandbox import math as math_tasks
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.tasks import Task, load_tasks

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**world):
    c = configlib.load(str(REPO / "configs/tiny.py"), "runlocal")
    c.world.update(world)
    return c


def read_all(source, cfg, data_dir, split="train") -> list[Task]:
    src = C.data_source(source, cfg, data_dir, split)
    out = []
    for ex in src:
        task = C.task_from_json(ex["task"])
        assert ex["id"].decode() == task.task_id
        out.append(task)
    return out


def assert_same_tasks(got: list[Task], want: list[Task]):
    """Same tasks (the files hold them in TFDS's key-hash order), equal down to the types."""
    by_id = {t.task_id: t for t in got}
    assert len(by_id) == len(got) == len(want)
    for t in want:
        assert by_id[t.task_id] == t
        assert repr(by_id[t.task_id]) == repr(t)   # 1 vs 1.0, tuple vs list would show here


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    config = tiny_config()
    return config, data_dir, C.prepare(config, data_dir)


def test_synthetic_tasks_round_trip_through_array_record(synthetic):
    config, data_dir, configs = synthetic
    assert set(configs) == {"tool"}   # math.fraction 0: the schedule is text only
    files = sorted((data_dir / "tarl_tool_tasks" / configs["tool"].name).rglob("*.array_record-*"))
    assert [f.name.split(".")[0] for f in files] == ["tarl_tool_tasks-test", "tarl_tool_tasks-train"]
    _, tasks = synth.generate(synth.SynthConfig(**config.world.synth))
    parts = synth.split(tasks, config.world.eval_tasks, config.world.val_tasks)
    assert_same_tasks(read_all("tool", configs["tool"], data_dir), parts["train"])
    assert_same_tasks(read_all("tool", configs["tool"], data_dir, "test"), parts["test"])
    # the tasks the trainer's world holds (warm start, eval) are the curriculum's
    world = components.build_world(config)
    assert_same_tasks(read_all("tool", configs["tool"], data_dir), world.train)


def test_prepare_is_idempotent_and_a_changed_source_is_a_new_dataset(synthetic):
    config, data_dir, configs = synthetic
    train = next((data_dir / "tarl_tool_tasks" / configs["tool"].name).rglob("*train.array_record-*"))
    before = train.stat().st_mtime_ns
    assert C.prepare(config, data_dir)["tool"].name == configs["tool"].name
    assert train.stat().st_mtime_ns == before
    config.world.synth.seed = 1
    assert C.source_configs(config)["tool"].name != configs["tool"].name


def test_taubench_retail_and_tau2_train_tasks_round_trip(taubench_dir, tmp_path):
    config = tiny_config(source="taubench", data_dir=str(taubench_dir))
    configs = C.prepare(config, tmp_path)
    want = load_tasks(taubench_dir / "v1/retail/tasks_train.json", "retail")
    assert len(want) == 500
    assert_same_tasks(read_all("tool", configs["tool"], tmp_path), want)
    # tau2: tasks.json split by split_tasks.json
    tau2 = tiny_config(source="taubench", data_dir=str(taubench_dir / "tau2/retail"))
    configs = C.prepare(tau2, tmp_path)
    all_tasks = {t.task_id: t for t in load_tasks(taubench_dir / "tau2/retail/tasks.json", "retail")}
    split = json.loads((taubench_dir / "tau2/retail/split_tasks.json").read_text())
    assert_same_tasks(read_all("tool", configs["tool"], tmp_path), [all_tasks[i] for i in split["train"]])
    assert_same_tasks(read_all("tool", configs["tool"], tmp_path, "test"),
                      [all_tasks[i] for i in split["test"]])


def test_math_jsonl_round_trips(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(7)]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config()
    config.math.source = f"jsonl:{path}"
    config.curriculum.schedule = "math"
    configs = C.prepare(config, tmp_path / "data")
    assert set(configs) == {"math"}
    assert_same_tasks(read_all("math", configs["math"], tmp_path / "data"), math_tasks.load_jsonl(path))


# ---------------------------------------------------------------------------- schedule, hosts, state

def fake_tasks(n: int, domain: str = "retail") -> list[dict]:
    """In-memory examples in the builders' format (grain reads any random-access sequence)."""
    return [{"task": C.task_to_json(Task(f"{domain[0]}{i}", domain, "u", "hi", [], [])).encode()}
            for i in range(n)]


def curriculum(schedule="text", n=3, process=0, count=1, **kw):
    sources = {"tool": fake_tasks(12), "math": fake_tasks(8, "math")}
    return C.Curriculum(sources, n, schedule, seed=0, process=process, count=count, **kw)


def ids(batch):
    return [t.task_id for t in batch.tasks]


def test_parse_schedule():
    assert C.parse_schedule("text*3,math") == ["text", "text", "text", "math"]
    assert C.parse_schedule("math, speech*2 ,text") == ["math", "speech", "speech", "text"]
    for bad in ("", "text,", "txt", "text*0", "text*x", "text*3*2"):
        with pytest.raises(ValueError, match="curriculum schedule"):
            C.parse_schedule(bad)


def test_math_fraction_becomes_the_old_schedule():
    c = tiny_config()
    for frac, spec in ((0.0, "text"), (0.25, "text*3,math"), (0.5, "text*1,math"), (1.0, "math")):
        c.math.fraction = frac
        assert C.schedule_spec(c) == spec
    c.curriculum.schedule = "speech"
    assert C.schedule_spec(c) == "speech"


def test_schedule_order_with_warmup():
    cur = curriculum("text*3,math", warmup_steps=2, warmup_schedule="math")
    kinds = [cur.next(s).kind for s in range(10)]
    assert kinds == ["math", "math", "text", "text", "text", "math", "text", "text", "text", "math"]
    cur = curriculum("math,text,speech")
    batches = [cur.next(s) for s in range(6)]
    assert [b.kind for b in batches] == ["math", "text", "speech"] * 2
    assert all(t.domain == "math" for b in batches if b.kind == "math" for t in b.tasks)
    assert all(t.domain == "retail" for b in batches if b.kind != "math" for t in b.tasks)


def test_every_epoch_covers_each_task_once_in_a_new_order():
    cur = curriculum("text", n=3)
    epochs = [[i for s in range(4 * e, 4 * e + 4) for i in ids(cur.next(s))] for e in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(f"r{i}" for i in range(12))
    assert epochs[0] != epochs[1] != epochs[2]


def test_two_hosts_get_disjoint_blocks_whose_union_is_the_single_host_batch():
    one = curriculum("text*2,math", n=4)
    hosts = [curriculum("text*2,math", n=4, process=p, count=2) for p in (0, 1)]
    for step in range(8):
        whole = one.next(step)
        parts = [h.next(step) for h in hosts]
        assert [p.kind for p in parts] == [whole.kind] * 2
        assert [p.first for p in parts] == [0, 2]
        assert ids(parts[0]) + ids(parts[1]) == ids(whole)
        assert not set(ids(parts[0])) & set(ids(parts[1]))
    with pytest.raises(ValueError, match="split evenly"):
        curriculum(n=3, process=0, count=2)


def test_evaluation_tasks_split_unevenly_over_hosts_cover_each_task_once():
    """115 tau-bench test tasks over 8 hosts: blocks of 15 and 14, in order, with their offsets."""
    from tarl_jax import distributed
    tasks = list(range(115))
    parts = [distributed.host_share(tasks, p, 8, even=False) for p in range(8)]
    assert [len(b) for b, _ in parts] == [15, 15, 15, 14, 14, 14, 14, 14]
    assert sum((b for b, _ in parts), []) == tasks
    assert all(b[0] == first for b, first in parts)


def test_state_resumes_the_exact_sequence():
    a = curriculum("text*2,math,speech", warmup_steps=1, warmup_schedule="math")
    for s in range(5):
        a.next(s)
    state = json.loads(json.dumps(a.get_state()))   # as the checkpoint's JSON stores it
    assert state["step"] == 5
    rest = [(b.kind, ids(b)) for b in (a.next(s) for s in range(5, 16))]
    b = curriculum("text*2,math,speech", warmup_steps=1, warmup_schedule="math")
    b.set_state(state)
    assert [(x.kind, ids(x)) for x in (b.next(s) for s in range(5, 16))] == rest
    with pytest.raises(ValueError, match="at step 16"):
        b.next(3)
    other = C.Curriculum({"tool": fake_tasks(12)}, 3, "text", names={"tool": "elsewhere"})
    with pytest.raises(ValueError, match="same data"):
        other.set_state(state)
