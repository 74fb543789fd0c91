"""Math family: answer grading (math-verify and its integer fallback), data loading
(reasoning-gym offline, GSM8K / DeepScaleR JSONL) and single-turn episodes."""
import json
import threading

import pytest

from tarl_jax.sandbox import math as m
from tarl_jax.sandbox.record import Episode

CASES = [
    ("So the total is \\boxed{42}.", "42", True),
    ("The answer is 1,000.", "1000", True),
    ("\\boxed{\\frac{2}{4}}", "0.5", True),
    ("Half of it: 0.5", "1/2", True),
    ("$\\frac{6}{3}$", "2", True),
    ("We get 7 first, and finally \\boxed{12}", "12", True),
    ("\\boxed{41}", "42", False),
    ("I cannot solve this.", "3", False),
    ("", "3", False),
]


@pytest.mark.parametrize("response,answer,ok", CASES)
def test_grade(response, answer, ok):
    assert m.grade(response, answer) is ok


def test_grade_in_worker_threads():
    # math-verify's timeouts need the main thread; rollout workers grade without them.
    out = []
    worker = threading.Thread(target=lambda: out.extend(m.grade(r, a) for r, a, _ in CASES))
    worker.start()
    worker.join()
    assert out == [ok for _, _, ok in CASES]


def test_integer_fallback(monkeypatch):
    def missing(*args):
        raise ImportError("math_verify")

    monkeypatch.setattr(m, "_math_verify", missing)
    assert m.grade("5 apples, then \\boxed{12} in all; check: 3", "12")
    assert m.grade("first 4, so 1,234", "1234")
    assert not m.grade("\\boxed{13}", "12")
    assert m.last_integer("no digits") is None


def test_final_answer():
    assert m.final_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert m.final_answer("$-5$") == "-5"
    assert m.final_answer("\\frac{1}{2}") == "\\frac{1}{2}"


def test_load_jsonl(tmp_path):
    rows = [{"question": "2+2?", "answer": "Two and two.\n#### 4"},
            {"problem": "Half of 1?", "answer": "\\frac{1}{2}"},
            {"problem": "6*7?", "answer": "42", "solution": "..."}]
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = m.load_jsonl(path)
    assert [(t.instruction, t.outputs) for t in tasks] == [("2+2?", ["4"]), ("6*7?", ["42"])]
    assert {t.domain for t in tasks} == {"math"} and len({t.task_id for t in tasks}) == 2
    assert len(m.load_jsonl(path, integer_only=False)) == 3
    assert len(m.load_jsonl(path, limit=1)) == 1
    path.write_text(json.dumps({"text": "no question"}))
    with pytest.raises(ValueError, match="question"):
        m.load_jsonl(path)


@pytest.mark.parametrize("name", ["gsm_symbolic", "basic_arithmetic"])
def test_reasoning_gym_offline_and_seeded(name):
    tasks = m.reasoning_gym_tasks(name, size=5, seed=3)
    assert tasks == m.reasoning_gym_tasks(name, size=5, seed=3)
    assert tasks != m.reasoning_gym_tasks(name, size=5, seed=4)
    for t in tasks:
        assert t.instruction and m.grade(f"\\boxed{{{t.outputs[0]}}}", t.outputs[0])


def test_math_episode():
    task = m.reasoning_gym_tasks("basic_arithmetic", size=1, seed=0)[0]
    answer = task.outputs[0]

    def solver(messages, tools):
        assert messages[1]["content"] == task.instruction and tools == []
        return {"role": "assistant", "content": f"Computing... \\boxed{{{answer}}}"}

    ep = m.run_math_episode(task, solver)
    assert (ep.mode, ep.domain, ep.termination, ep.reward) == ("math", "math", "answered", 1.0)
    assert [getattr(t, "kind", "agent") for t in ep.turns] == ["system", "user", "agent"]
    assert Episode.from_json(ep.to_json()) == ep
    wrong = m.run_math_episode(task, lambda msgs, tools: {"content": "\\boxed{999999}"})
    assert wrong.reward == 0.0 and wrong.messages[-1]["role"] == "assistant"

    def broken(messages, tools):
        raise RuntimeError("out of memory")

    err = m.run_math_episode(task, broken)
    assert err.termination == "agent_error" and "out of memory" in err.reward_info["traceback"]
