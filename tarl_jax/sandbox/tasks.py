"""Tasks in one shape for tau-bench v1 task lists and tau2-bench tasks.json files."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import textwrap


@dataclasses.dataclass
class Action:
    name: str
    kwargs: dict


@dataclasses.dataclass
class Task:
    task_id: str
    domain: str
    user_id: str
    instruction: str
    actions: list[Action]                           # gold tool calls, in order
    outputs: list[str]                              # strings the agent must say
    extra: dict = dataclasses.field(default_factory=dict)  # tau2: the raw task


def _tau2_instruction(scenario: dict) -> str:
    """The text tau2's user simulator is given: its parts as titled, tab-indented blocks."""
    parts = scenario.get("instructions") or {}
    if isinstance(parts, str):
        return parts
    lines = [f"Domain: {parts.get('domain')}"]
    for key, title in [("reason_for_call", "Reason for call"), ("known_info", "Known info"),
                       ("unknown_info", "Unknown info"), ("task_instructions", "Task instructions")]:
        if parts.get(key) is not None:
            body = textwrap.indent(parts[key], "\t")
            lines.append(f"{title}:\n{body}")
    return "\n".join(lines)


def _tau2_task(raw: dict, domain: str) -> Task:
    criteria = raw.get("evaluation_criteria") or {}
    scenario = raw.get("user_scenario") or {}
    instruction = _tau2_instruction(scenario)
    user = re.search(r"user id is:?\s*([A-Za-z0-9_]+)", instruction, re.I)
    return Task(
        task_id=str(raw["id"]), domain=domain, user_id=user.group(1) if user else "",
        instruction=instruction,
        actions=[Action(a["name"], a.get("arguments") or {})
                 for a in criteria.get("actions") or []],
        outputs=list(criteria.get("communicate_info") or []), extra=raw)


def parse_tasks(raw: list[dict], domain: str) -> list[Task]:
    tasks = []
    for i, t in enumerate(raw):
        if "user_scenario" in t:
            tasks.append(_tau2_task(t, domain))
        else:
            tasks.append(Task(
                task_id=str(t.get("task_id", i)), domain=domain, user_id=t["user_id"],
                instruction=t["instruction"],
                actions=[Action(a["name"], a["kwargs"]) for a in t["actions"]],
                outputs=list(t.get("outputs", []))))
    return tasks


def load_tasks(path: str | pathlib.Path, domain: str) -> list[Task]:
    """A v1 `tasks_*.json` (task ids are list positions) or a tau2 `tasks.json` (its ids)."""
    return parse_tasks(json.loads(pathlib.Path(path).read_text()), domain)


@dataclasses.dataclass(frozen=True)
class DataDir:
    """One domain of tau-bench data, in either layout.

    v1 (tau-bench): users.json, orders.json, ... + wiki.md, tasks_train.json + tasks_test.json.
    tau2 (tau2-bench): db.json + policy.md, tasks.json + split_tasks.json ({"train": [ids], ...}).
    """
    path: pathlib.Path
    domain: str
    flavor: str            # "v1" | "tau2"

    @property
    def task_files(self) -> tuple[pathlib.Path, pathlib.Path]:
        names = (("tasks_train.json", "tasks_test.json") if self.flavor == "v1" else
                 ("tasks.json", "split_tasks.json"))
        files = tuple(self.path / n for n in names)
        if not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{self.path} ({self.flavor} layout) lacks "
                                    f"{' + '.join(n for n, f in zip(names, files) if not f.is_file())}")
        return files

    def load_splits(self) -> dict[str, list[Task]]:
        """{"train": [...], "test": [...]}: v1's two files, or tau2's tasks split by id."""
        first, second = self.task_files
        if self.flavor == "v1":
            return {"train": load_tasks(first, self.domain), "test": load_tasks(second, self.domain)}
        tasks = {t.task_id: t for t in load_tasks(first, self.domain)}
        ids = json.loads(second.read_text())
        return {split: [tasks[str(i)] for i in ids[split]] for split in ("train", "test")}


def find_data_dir(data_dir: str | pathlib.Path, domain: str) -> DataDir:
    """The one rule for locating a domain's data: `data_dir` is a v1 or tau2 domain directory,
    or a root holding v1/<domain> (taken first) or tau2/<domain>."""
    path = pathlib.Path(data_dir).resolve()
    for sub in ("v1", "tau2"):
        if (path / sub / domain).is_dir():
            path = path / sub / domain
            break
    if (path / "db.json").is_file():
        return DataDir(path, domain, "tau2")
    if (path / "wiki.md").is_file() or (path / "users.json").is_file():
        return DataDir(path, domain, "v1")
    raise FileNotFoundError(f"{data_dir}: no tau-bench {domain!r} data (neither a v1 domain dir "
                            f"with users.json / wiki.md, a tau2 one with db.json, nor a root "
                            f"holding v1/{domain} or tau2/{domain})")
