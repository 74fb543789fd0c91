"""User simulators: the LLM user against a local OpenAI-compatible server (retries, failures),
the deterministic offline user, and the replay user."""
import http.server
import json
import threading
import time

import pytest

from tarl_jax.sandbox import synth
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import UserError, run_episode
from tarl_jax.sandbox.tasks import Action, Task, load_tasks
from tarl_jax.sandbox.user import (GREETING, LLMUser, LLMUserConfig, OfflineUser, ReplayUser,
                                   dialogue_key, user_factory)


class FakeLLM:
    """A local chat-completions endpoint; each request takes the next step of `plan`:
    a reply text, or "500", "400", "slow" (answers after the client gave up), "empty"."""

    def __init__(self):
        self.plan, self.requests = [], []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                step = fake.plan.pop(0) if fake.plan else "500"
                if step in ("500", "400"):
                    return self._send(int(step), {"error": {"message": "boom"}})
                if step == "slow":
                    time.sleep(1.0)
                text = "" if step == "empty" else step
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0,
                                 "model": body["model"], "choices": [{
                                     "index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def llm():
    fake = FakeLLM()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def cfg(llm):
    llm.plan.clear()
    llm.requests.clear()
    return LLMUserConfig(model="sim", base_url=llm.url, timeout=0.3, max_retries=2, backoff=0.0)


@pytest.fixture(scope="module")
def synthetic():
    return synth.make_world(synth.SynthConfig(num_tasks=40))


DIALOGUE = [{"role": "system", "content": "policy"}, {"role": "user", "content": "I need help"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
             "function": {"name": "think", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "secret"},
            {"role": "assistant", "content": "Your email please?"}]


def test_llm_user_prompt(llm, cfg):
    llm.plan[:] = ["Hello, I want to cancel an order.", "It is a@b.c  ###STOP###"]
    user = LLMUser("You are Ann. Your email is a@b.c.", cfg)
    assert user.reply(DIALOGUE[:1]) == "Hello, I want to cancel an order."
    chat = llm.requests[0]["messages"]
    assert chat[0]["role"] == "system" and "Your email is a@b.c." in chat[0]["content"]
    assert "###STOP###" in chat[0]["content"] and "one short line" in chat[0]["content"]
    assert chat[1:] == [{"role": "user", "content": GREETING}]
    assert llm.requests[0]["model"] == "sim" and llm.requests[0]["temperature"] == 0.0
    assert user.reply(DIALOGUE) == "###STOP###"
    assert llm.requests[1]["messages"][1:] == [  # roles swapped, tool traffic hidden
        {"role": "user", "content": GREETING}, {"role": "assistant", "content": "I need help"},
        {"role": "user", "content": "Your email please?"}]


def test_llm_user_retries_timeouts_5xx_and_empty(llm, cfg):
    llm.plan[:] = ["500", "slow", "empty", "Fine."]
    cfg.max_retries = 3
    assert LLMUser("x", cfg).reply(DIALOGUE) == "Fine."
    assert len(llm.requests) == 4


def test_llm_user_gives_up_and_episode_is_marked(llm, cfg, synthetic):
    world, tasks = synthetic
    task = tasks[0]
    llm.plan[:] = ["Hi, I need to change something."]  # then only 500s
    make_user = user_factory("llm", model="sim", base_url=llm.url, timeout=0.3, max_retries=2,
                             backoff=0.0)
    env = Env(world, task)
    ep = run_episode(env, task, synth.ExpertAgent(task), make_user(task, env))
    assert ep.termination == "user_error"
    assert "after 3 attempts" in ep.reward_info["user_error"]
    assert "InternalServerError" in ep.reward_info["user_error"]
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant"]
    assert len(llm.requests) == 4


def test_llm_user_episode_with_expert(llm, cfg, synthetic):
    world, tasks = synthetic
    task = next(t for t in tasks if t.extra["kinds"] == ["cancel"])
    ident = task.extra["identity"]
    llm.plan[:] = ["I'd like to cancel an order, please.",
                   f"Sure: {ident['email']}, or {ident['first_name']} {ident['last_name']} "
                   f"in {ident['zip']}.", "Yes, go ahead.", "Thanks! ###STOP###"]
    user = LLMUser(task.instruction, cfg)
    ep = run_episode(Env(world, task), task, synth.ExpertAgent(task), user)
    assert (ep.termination, ep.reward) == ("user_stop", 1.0)
    assert ep.messages[1]["content"] == "I'd like to cancel an order, please."
    assert len(llm.requests) == 4


def test_llm_user_does_not_retry_client_errors(llm, cfg):
    llm.plan[:] = ["400", "never used"]
    with pytest.raises(UserError, match="refused"):
        LLMUser("x", cfg).reply(DIALOGUE)
    assert len(llm.requests) == 1


def test_llm_user_unreachable(cfg):
    cfg.base_url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    with pytest.raises(UserError, match="APIConnectionError"):
        LLMUser("x", cfg).reply(DIALOGUE)


def tool_call(action):
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function",
        "function": {"name": action.name, "arguments": json.dumps(action.kwargs)}}]}


def test_offline_user_answers_from_the_task(synthetic):
    world, tasks = synthetic
    task = next(t for t in tasks if t.extra["kinds"] == ["cancel"])
    user = OfflineUser(task, world)
    order = task.actions[-1].kwargs["order_id"]
    base = DIALOGUE[:1]
    opening = user.reply(base)
    assert order in opening and task.actions[-1].kwargs["reason"] in opening
    ident = task.extra["identity"]
    said = base + [{"role": "user", "content": opening}]
    answer = user.reply(said + [{"role": "assistant", "content": "Can you verify your identity?"}])
    assert (ident["email"] if ident["by"] == "email" else ident["zip"]) in answer
    ask = {"role": "assistant", "content": f"I will cancel {order}. Shall I proceed (yes/no)?"}
    assert user.reply(said + [ask]) == "Yes, please go ahead."
    done = said + [ask, {"role": "user", "content": "yes"}, tool_call(task.actions[-1]),
                   {"role": "tool", "tool_call_id": "c", "content": "{}"},
                   {"role": "assistant", "content": "Done. Anything else?"}]
    assert user.reply(done) == "###STOP###"
    wrong = [dict(m) for m in done]
    wrong[-3] = tool_call(Action("cancel_pending_order", {"order_id": "#W0", "reason": "x"}))
    assert "cancel order" in user.reply(wrong)  # the gold write is still missing: ask again


def test_offline_user_asks_for_outputs(synthetic):
    world, tasks = synthetic
    task = next(t for t in tasks if t.extra["kinds"] == ["lookup"])
    user = OfflineUser(task, world)
    opening = user.reply(DIALOGUE[:1])
    assert task.extra["question"] in opening
    said = DIALOGUE[:1] + [{"role": "user", "content": opening}]
    more = {"role": "assistant", "content": "Anything else?"}
    assert user.reply(said + [more]) == task.extra["question"]
    answer = {"role": "assistant", "content": task.extra["answer"]}
    assert user.reply(said + [answer]) == "###STOP###"


def test_offline_user_identity_sources(taubench_dir):
    world = World.from_dir("retail", taubench_dir / "v1/retail")
    tasks = load_tasks(taubench_dir / "v1/retail/tasks_test.json", "retail")
    no_find = next(t for t in tasks if not any(a.name.startswith("find_user") for a in t.actions))
    user = json.loads(world.initial_text("users", no_find.user_id))
    assert OfflineUser(no_find, world).identity == (
        f"I'm {user['name']['first_name']} {user['name']['last_name']}, "
        f"zip code {user['address']['zip']}.")
    by_email = next(t for t in tasks if t.actions and t.actions[0].name == "find_user_id_by_email")
    assert by_email.actions[0].kwargs["email"] in OfflineUser(by_email, world).identity
    airline = Task("a", "airline", "mia_li_3668", "", [], [])
    assert OfflineUser(airline).identity == "My user id is mia_li_3668."


def test_replay_user(synthetic):
    world, tasks = synthetic
    task = tasks[1]
    recorded = run_episode(Env(world, task), task, synth.ExpertAgent(task),
                           OfflineUser(task, world))
    table = ReplayUser.record([recorded])
    replayed = run_episode(Env(world, task), task, synth.ExpertAgent(task), ReplayUser(table))
    assert replayed.messages == recorded.messages and replayed.reward == 1.0
    # Tool traffic is invisible to the user: same key with or without it.
    assert dialogue_key(DIALOGUE) == dialogue_key(DIALOGUE[:2] + DIALOGUE[4:])
    with pytest.raises(UserError, match="no recorded user reply"):
        ReplayUser(table).reply(DIALOGUE)
    fallback = ReplayUser(table, fallback=OfflineUser(task, world))
    assert fallback.reply(DIALOGUE[:1]).startswith("Hi!")
