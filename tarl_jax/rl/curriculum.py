"""The RL curriculum: task datasets as TFDS builders (array_record), read with grain, mixed by a
schedule, sharded by host, with a checkpointable position.

Datasets. One TFDS builder per task family; an example is one task's JSON plus its id:
    tarl_tool_tasks   tool-use tasks: the synthetic generator's (seed, sizes), or a tau-bench
                      directory (v1 `tasks_{train,test}.json`, or tau2 `tasks.json` split by
                      `split_tasks.json`); splits train and test
    tarl_math_tasks   math problems: a reasoning-gym generator or a JSONL file; split train
`prepare` writes what a config needs once, as array_record (writing and reading need no
TensorFlow). A builder config's name ends in a hash of everything its examples depend on (the
generator's arguments, the source file's bytes), so a changed source becomes a new dataset, never
a stale one, and preparing again is a no-op.

Reading. Per source, a grain pipeline: `tfds.data_source` -> MapDataset -> decode -> shuffle(seed)
(grain reshuffles every epoch) -> repeat -> batch of `rollout.tasks_per_step` -> this host's
contiguous block (`distributed.host_share`: a task's G samples stay on one host). Every host
builds the same global batch from the same files, so hosts agree without communicating.

Mixing. `curriculum.schedule` is a comma list cycled by step, entries `text`, `speech` (tool-use
tasks with a text or a speech user) and `math`, each optionally repeated: `text*3,math`. The first
`warmup_steps` steps cycle `warmup_schedule` instead (the paper warms up on simpler tasks, then
alternates). An empty schedule is derived from `math.fraction` (every round(1/fraction)-th batch is
math), the knob older configs and sweeps use. Text and speech batches draw from one tool-use stream.

Resume. `get_state()` (the step plus grain's iterator state of every source) goes into each
checkpoint's JSON metadata and `set_state` restores it, so a run killed at any point continues
with exactly the batches it would have seen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import pathlib
import re

import grain
import jax
import tensorflow_datasets as tfds

from tarl_jax import distributed
from tarl_jax.sandbox import math as math_tasks
from tarl_jax.sandbox import synth
from tarl_jax.sandbox.tasks import Action, Task, find_data_dir

log = logging.getLogger("tarl_jax")


class _TfdsNoise(logging.Filter):
    """Every config here is custom by design (named by the hash of its data) and written by us:
    tfds's warnings about that would open every run's log. Other tfds messages pass."""
    NOISE = ("Using custom data configuration", "has no dataset_info.json")

    def filter(self, record):
        return not any(n in record.getMessage() for n in self.NOISE)


logging.getLogger("absl").addFilter(_TfdsNoise())

KINDS = {"text": "tool", "speech": "tool", "math": "math"}   # batch kind -> source it draws from
FILE_FORMAT = "array_record"
# Reading is a JSON parse per task: threads would only prefetch batches nobody asked for yet.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# ---------------------------------------------------------------------------- task <-> JSON

def task_to_json(task: Task) -> str:
    # Key order kept (no sort_keys): a decoded task equals the original down to dict order.
    return json.dumps(dataclasses.asdict(task))


def task_from_json(text: str | bytes) -> Task:
    d = json.loads(text)
    d["actions"] = [Action(**a) for a in d["actions"]]
    return Task(**d)


# ---------------------------------------------------------------------------- TFDS builders

@dataclasses.dataclass(eq=False)
class TaskSetConfig(tfds.core.BuilderConfig):
    """`spec` (JSON-able) says what to generate; `name` is derived from it by `make_config`."""
    spec: dict = dataclasses.field(default_factory=dict)


def make_config(label: str, spec: dict, files: tuple[pathlib.Path, ...] = ()) -> TaskSetConfig:
    # Paths are left out of the hash and the files' bytes put in: the same data found at another
    # path is the same dataset, edited data is a new one.
    digest = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k not in ("dir", "file")},
                                       sort_keys=True).encode())
    for f in files:
        digest.update(f.read_bytes())
    slug = re.sub(r"[^a-z0-9_]+", "_", label.lower()).strip("_")
    return TaskSetConfig(name=f"{slug}-{digest.hexdigest()[:12]}", spec=spec)


class _TaskBuilder(tfds.core.GeneratorBasedBuilder):
    """Examples {"id": task id, "task": task JSON}; subclasses say which tasks form each split."""
    VERSION = tfds.core.Version("1.0.0")

    def _splits(self) -> dict[str, list[Task]]:
        raise NotImplementedError

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=tfds.features.FeaturesDict({
                                         "id": tfds.features.Text(), "task": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(tasks) for name, tasks in self._splits().items()}

    def _generate_examples(self, tasks):
        for i, task in enumerate(tasks):
            yield i, {"id": task.task_id, "task": task_to_json(task)}


class TarlToolTasks(_TaskBuilder):
    """Tool-use tasks (tau-bench format): synthetic, or from a tau-bench v1 / tau2 directory."""

    def _splits(self):
        s = self.builder_config.spec
        if s["source"] == "synthetic":
            _, tasks = synth.generate(synth.SynthConfig(**s["synth"]))
            parts = synth.split(tasks, s["eval_tasks"], s.get("val_tasks", 0))
            return {"train": parts["train"], "test": parts["test"]}
        return find_data_dir(s["dir"], s["domain"]).load_splits()


class TarlMathTasks(_TaskBuilder):
    """Math problems: a reasoning-gym generator or a JSONL file of question/answer rows."""

    def _splits(self):
        s = self.builder_config.spec
        if s["generator"]:
            return {"train": math_tasks.reasoning_gym_tasks(s["generator"], size=s["size"],
                                                            seed=s["seed"])}
        return {"train": math_tasks.load_jsonl(s["file"])}


BUILDERS = {"tool": TarlToolTasks, "math": TarlMathTasks}


def source_configs(config) -> dict[str, TaskSetConfig]:
    """The builder config of every source the schedule draws from."""
    needed = {KINDS[k] for k in parse_schedule(schedule_spec(config))}
    if config.curriculum.warmup_steps:
        needed |= {KINDS[k] for k in parse_schedule(config.curriculum.warmup_schedule)}
    out = {}
    w = config.world
    if "tool" in needed:
        if w.source == "synthetic" and not w.data_dir:
            spec = {"source": "synthetic", "synth": dict(w.synth), "eval_tasks": w.eval_tasks}
            if w.get("val_tasks", 0):
                spec["val_tasks"] = w.val_tasks
            out["tool"] = make_config("synthetic", spec)
        else:
            data = find_data_dir(w.data_dir, w.domain)
            out["tool"] = make_config(w.domain, {"source": "dir", "dir": str(data.path),
                                                 "domain": w.domain}, data.task_files)
    if "math" in needed:
        kind, _, name = config.math.source.partition(":")
        if kind == "reasoning_gym":
            out["math"] = make_config(name, {"generator": name, "size": config.math.size,
                                             "seed": config.seed})
        else:
            path = pathlib.Path(name or kind).resolve()
            out["math"] = make_config(path.stem, {"generator": "", "file": str(path)}, (path,))
    return out


def builder(source: str, cfg: TaskSetConfig, data_dir) -> tfds.core.DatasetBuilder:
    return BUILDERS[source](config=cfg, data_dir=str(data_dir), file_format=FILE_FORMAT)


def prepare(config, data_dir) -> dict[str, TaskSetConfig]:
    """Writes every dataset the config needs under `data_dir` (once: prepared ones are kept)."""
    tfds.disable_progress_bar()
    configs = source_configs(config)
    for source, cfg in configs.items():
        b = builder(source, cfg, data_dir)
        if b.is_prepared():
            log.info("curriculum: %s/%s already in %s", b.name, cfg.name, data_dir)
            continue
        log.info("curriculum: preparing %s/%s in %s", b.name, cfg.name, data_dir)
        with contextlib.redirect_stdout(io.StringIO()):   # tfds prints "Downloading ..."
            b.download_and_prepare()
        log.info("curriculum: %s/%s written (%s)", b.name, cfg.name,
                 ", ".join(f"{k}: {v.num_examples} tasks" for k, v in b.info.splits.items()))
    return configs


def data_source(source: str, cfg: TaskSetConfig, data_dir, split: str = "train"):
    """Random access to a prepared split (array_record, through `tfds.data_source`)."""
    return tfds.data_source(BUILDERS[source].name, split=split, data_dir=str(data_dir),
                            download=False, builder_kwargs=dict(config=cfg, file_format=FILE_FORMAT))


# ---------------------------------------------------------------------------- schedule

def schedule_spec(config) -> str:
    """`curriculum.schedule`, or the one `math.fraction` implies when it is empty."""
    if config.curriculum.schedule:
        return config.curriculum.schedule
    frac = config.math.fraction
    if frac <= 0:
        return "text"
    every = max(round(1 / frac), 1)
    return "math" if every == 1 else f"text*{every - 1},math"


def parse_schedule(spec: str) -> list[str]:
    """'text*3,math' -> ['text', 'text', 'text', 'math']."""
    out = []
    for entry in spec.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*(?:\*\s*(\d+)\s*)?", entry)
        if not m or m.group(1) not in KINDS or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(f"curriculum schedule {spec!r}: bad entry {entry!r}; entries are "
                             f"{'|'.join(KINDS)} with an optional *N (N >= 1), comma separated")
        out += [m.group(1)] * int(m.group(2) or 1)
    return out


@dataclasses.dataclass
class Batch:
    kind: str          # text | speech | math
    tasks: list        # this host's contiguous block of the step's tasks
    first: int         # index of tasks[0] in the step's global batch


def pipeline(source, tasks_per_step: int, seed: int, process: int, count: int) -> grain.MapDataset:
    """Step i's element: (this host's tasks of the i-th batch drawn from `source`, first index)."""
    return (grain.MapDataset.source(source)
            .map(lambda ex: task_from_json(ex["task"]))
            .shuffle(seed=seed)
            .repeat()
            .batch(tasks_per_step, batch_fn=list)
            .map(lambda tasks: distributed.host_share(tasks, process, count)))


class Curriculum:
    """Yields one `Batch` per RL step, following the schedule; `get_state`/`set_state` resume."""

    def __init__(self, sources: dict, tasks_per_step: int, schedule: str, seed: int = 0,
                 warmup_steps: int = 0, warmup_schedule: str = "text",
                 names: dict[str, str] | None = None, process: int | None = None,
                 count: int | None = None):
        """`sources`: source name -> random-access sequence of examples; `names` identify them
        in the state (a checkpoint must resume on the same data)."""
        process = jax.process_index() if process is None else process
        count = jax.process_count() if count is None else count
        distributed.host_share(range(tasks_per_step), process, count)   # fails early if uneven
        self.schedule = parse_schedule(schedule)
        self.warmup = parse_schedule(warmup_schedule) if warmup_steps else []
        self.warmup_steps = warmup_steps
        needed = {KINDS[k] for k in self.schedule + self.warmup}
        if not needed <= set(sources) <= set(BUILDERS):
            raise ValueError(f"sources {sorted(sources)}: the schedule needs {sorted(needed)}, "
                             f"known sources are {list(BUILDERS)}")
        self.names = names or {s: s for s in sources}
        self._iters = {}
        for s, src in sources.items():
            if not len(src):
                raise ValueError(f"curriculum source {self.names[s]!r} holds no task")
            # grain shuffles epoch e with seed + e: run seeds and sources are spaced so that no
            # stream replays another's order a few epochs later.
            shuffle_seed = (seed * 2**16 + list(BUILDERS).index(s)) % 2**32
            ds = pipeline(src, tasks_per_step, shuffle_seed, process, count)
            self._iters[s] = iter(ds.to_iter_dataset(_READ))
        self.step = 0

    @classmethod
    def from_config(cls, config, data_dir) -> "Curriculum":
        """Prepares the datasets (process 0 first, so hosts sharing `data_dir` write it once)."""
        if jax.process_index() == 0:
            configs = prepare(config, data_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("curriculum prepared")
        if jax.process_index() != 0:
            configs = prepare(config, data_dir)   # a no-op on a shared filesystem
        c = config.curriculum
        return cls({s: data_source(s, cfg, data_dir) for s, cfg in configs.items()},
                   config.rollout.tasks_per_step, schedule_spec(config), config.seed,
                   c.warmup_steps, c.warmup_schedule,
                   names={s: f"{BUILDERS[s].name}/{cfg.name}" for s, cfg in configs.items()})

    def kind(self, step: int) -> str:
        if step < self.warmup_steps:
            return self.warmup[step % len(self.warmup)]
        return self.schedule[(step - self.warmup_steps) % len(self.schedule)]

    def next(self, step: int) -> Batch:
        """The batch of RL step `step`, which must be the curriculum's position."""
        if step != self.step:
            raise ValueError(f"curriculum is at step {self.step}, asked for step {step}: restore "
                             "its state (set_state) with the train state")
        kind = self.kind(step)
        tasks, first = next(self._iters[KINDS[kind]])
        self.step += 1
        return Batch(kind, tasks, first)

    def get_state(self) -> dict:
        return {"step": self.step,
                "sources": {s: {"dataset": self.names[s], "iterator": it.get_state()}
                            for s, it in self._iters.items()}}

    def set_state(self, state: dict) -> None:
        for s, saved in state["sources"].items():
            if s not in self._iters:
                continue  # the schedule no longer draws from it
            if saved["dataset"] != self.names[s]:
                raise ValueError(f"the checkpoint's curriculum read {saved['dataset']}, this "
                                 f"config reads {self.names[s]}: resume with the same data")
            self._iters[s].set_state(saved["iterator"])
        self.step = state["step"]
