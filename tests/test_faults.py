"""Fault injection: an OpenAI-compatible endpoint that fails the way real ones do, and what the
LLM judge and the LLM user simulator make of it. No failure may escape as an exception out of a
rollout or a training step: each is a counted retry, then a reply, a fallback or a UserError.

Each request takes the next step of the server's plan: "ok", or a fault below. Then a disk
that fills up under a running trainer. (Corrupt checkpoints: test_checkpoint_integrity.py;
kill -9 and exact resume: test_trainer.py; non-finite updates: test_rl_step.py, test_trainer.py.)
"""
import http.server
import json
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest

from tarl_jax.judge import llm
from tarl_jax.sandbox.episode import UserError
from tarl_jax.sandbox.user import LLMUser, LLMUserConfig

# fault -> what the server does instead of answering
FAULTS = {
    "500": "HTTP 500 with an error body",
    "429": "HTTP 429 with Retry-After: 1",
    "close": "closes the connection without a response",
    "hang": "never answers",
    "drip": "sends a 200's headers, then a byte every 0.2 s",
    "notjson": "a 200 whose body is not JSON",
    "nochoices": "a 200 JSON object without choices",
    "choices_str": "a 200 whose choices is a string",
    "content_obj": "a 200 whose message content is an object",
}
# and "huge": a 200 whose content is 4 MB of text (not a retry: an invalid verdict, a broken reply)
MALFORMED = ("notjson", "nochoices", "choices_str", "content_obj")


class FaultyEndpoint:
    def __init__(self):
        self.plan, self.arrivals = [], []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.arrivals.append(time.monotonic())
                step = fake.plan.pop(0) if fake.plan else "ok"
                try:
                    self.act(step, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up

            def send(self, code, data: bytes, headers=()):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def act(self, step, body):
                if step == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if step == "hang":
                    time.sleep(5)
                    return
                if step in ("500", "429"):
                    headers = [("Retry-After", "1")] if step == "429" else []
                    return self.send(int(step), b'{"error": {"message": "busy"}}', headers)
                if step == "notjson":
                    return self.send(200, b"<html>gateway says hello</html>")
                if step == "nochoices":
                    return self.send(200, b'{"id": "x", "object": "chat.completion"}')
                content = "x" * 4_000_000 if step == "huge" else fake.content(body)
                message = {"role": "assistant", "content": {"text": content}
                           if step == "content_obj" else content}
                choices = "none" if step == "choices_str" else [
                    {"index": 0, "finish_reason": "stop", "message": message}]
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                   "model": body["model"], "choices": choices}).encode()
                if step != "drip":
                    return self.send(200, data)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for b in data:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.2)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def content(body) -> str:
        prompt = body["messages"][-1]["content"]
        m = re.search(r"## Dialogue \((\d+) agent turns\)", prompt)
        if m is None:                    # the user simulator
            return "Yes, please go ahead."
        return json.dumps({"turns": [{"turn": t, "score": 1, "reason": "ok"}
                                     for t in range(1, int(m.group(1)) + 1)]})


@pytest.fixture(scope="module")
def endpoint():
    fake = FaultyEndpoint()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def fake(endpoint):
    endpoint.plan.clear()
    endpoint.arrivals.clear()
    return endpoint


def item():
    task = {"instruction": "cancel", "domain": "retail", "outputs": [], "user_id": "u",
            "actions": [{"name": "get_order_details", "kwargs": {"order_id": "#W1"}}]}
    msgs = [{"role": "system", "content": "policy"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "turn 1"}, {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "turn 2"}]
    return task, msgs


def judge_cfg(url, tmp_path, **kw):
    return dict(dict(base_url=url, api_key="test", model="judge", timeout=1.0, max_retries=2,
                     retry_backoff_s=0.0, max_repairs=0, cache_dir=str(tmp_path / "cache")), **kw)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_judge_retries_each_fault_then_answers(fake, tmp_path, fault):
    fake.plan[:] = [fault, "ok"]
    t0 = time.monotonic()
    (j,), stats = llm.judge_batch([item()], judge_cfg(fake.url, tmp_path))
    assert j.source == "llm" and j.scores == [1, 1], (FAULTS[fault], j.meta)
    assert stats["transport_retries"] == 1 and stats["fallbacks"] == 0
    assert stats["malformed_answers"] == (fault in MALFORMED)
    # hang and drip are cut by the whole-answer deadline (1 s), not after 5 s or the 40-byte drip
    assert time.monotonic() - t0 < 4.0


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_judge_falls_back_to_rules_when_every_try_fails(fake, tmp_path, fault):
    fake.plan[:] = [fault] * 3
    (j,), stats = llm.judge_batch([item()], judge_cfg(fake.url, tmp_path, max_retry_after_s=0.1))
    assert j.source == "rule" and j.meta["fallback_from"] == "llm" and len(j.scores) == 2
    assert stats["fallbacks"] == 1 and stats["requests"] == 3


def test_a_huge_answer_is_an_invalid_verdict_not_a_crash(fake, tmp_path):
    fake.plan[:] = ["huge"]                      # 4 MB of text where a verdict should be
    t0 = time.monotonic()
    (j,), stats = llm.judge_batch([item()], judge_cfg(fake.url, tmp_path))
    assert j.source == "rule" and "not valid JSON" in j.meta["error"]
    assert stats["invalid_answers"] == 1 and time.monotonic() - t0 < 10


def test_judge_honours_retry_after(fake, tmp_path):
    fake.plan[:] = ["429", "ok"]
    (j,), _ = llm.judge_batch([item()], judge_cfg(fake.url, tmp_path))
    assert j.source == "llm"
    assert fake.arrivals[1] - fake.arrivals[0] >= 0.9     # Retry-After: 1, backoff 0


def test_corrupt_cache_entry_is_ignored_and_rewritten(fake, tmp_path):
    cfg = judge_cfg(fake.url, tmp_path)
    (first,), _ = llm.judge_batch([item()], cfg)
    [entry] = (tmp_path / "cache").glob("*.json")
    entry.write_text(entry.read_text()[:10])               # truncated by a crash
    (again,), stats = llm.judge_batch([item()], cfg)
    assert again.scores == first.scores and stats["requests"] == 1 and stats["cache_hits"] == 0
    json.loads(entry.read_text())                          # rewritten whole
    (third,), stats = llm.judge_batch([item()], cfg)
    assert stats["cache_hits"] == 1 and stats["requests"] == 0


def user_cfg(url, **kw):
    return LLMUserConfig(**dict(dict(model="sim", base_url=url, timeout=1.0, max_retries=2,
                                     backoff=0.0), **kw))


DIALOGUE = [{"role": "system", "content": "policy"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Shall I cancel it?"}]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_user_simulator_retries_each_fault_then_replies(fake, fault):
    fake.plan[:] = [fault, "ok"]
    t0 = time.monotonic()
    assert LLMUser("x", user_cfg(fake.url)).reply(DIALOGUE) == "Yes, please go ahead."
    assert len(fake.arrivals) == 2 and time.monotonic() - t0 < 4.0
    if fault == "429":
        assert fake.arrivals[1] - fake.arrivals[0] >= 0.9


def test_user_simulator_retries_a_huge_reply(fake):
    fake.plan[:] = ["huge", "ok"]
    assert LLMUser("x", user_cfg(fake.url)).reply(DIALOGUE) == "Yes, please go ahead."
    assert len(fake.arrivals) == 2


def test_user_simulator_gives_up_with_a_user_error(fake):
    fake.plan[:] = ["notjson", "drip", "nochoices"]
    with pytest.raises(UserError, match="after 3 attempts: malformed answer.*whole answer"):
        LLMUser("x", user_cfg(fake.url)).reply(DIALOGUE)


# ------------------------------------------------------------------------------ disk full

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "tarl_jax.main", "--config=configs/tiny.py:runlocal,algo=ppo",
       "--config.model.preset=micro", "--config.total_steps=6", "--config.checkpoint_every=1",
       "--config.eval_every=6"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: a micro model's first checkpoints fit, a later one does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({out.stderr.strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(tmp_path, small_disk):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").symlink_to(small_disk)
    out = subprocess.run([*RUN, f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"error: no space left on device while saving step (\d) to (\S+) \(the "
                     r"previous checkpoint is intact; .*\)", last)
    assert m, last
    failed = int(m.group(1))
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert failed >= 1 and max(steps) <= failed + 1     # stopped within a step of the failure
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    out = subprocess.run([*RUN, f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {failed - 1}" in out.stderr
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
