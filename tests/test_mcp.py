"""The MCP server end to end: a real MCP client drives `python -m tarl_jax.sandbox.mcp` over stdio,
and every answer must be the one `Env.call` gives on a fresh fork of the same world."""
import contextlib
import json
import pathlib
import sys

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tarl_jax.sandbox import synth
from tarl_jax.sandbox.env import Env

REPO = pathlib.Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def connect(*args: str):
    """A session (and its initialize result) with a fresh server process."""
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO),
                                   args=["-m", "tarl_jax.sandbox.mcp", *args])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        info = await session.initialize()
        yield session, info


def run(main) -> None:
    async def bounded():
        with anyio.fail_after(25):  # a hung server fails the test instead of the CI job
            await main()
    anyio.run(bounded)


async def call(session: ClientSession, name: str, arguments: dict) -> tuple[str, bool]:
    result = await session.call_tool(name, arguments)
    [content] = result.content
    return content.text, result.is_error


@pytest.fixture(scope="module")
def synthetic():
    return synth.make_world(synth.SynthConfig(seed=0))


def test_synthetic_episode(synthetic):
    world, _ = synthetic
    fresh = Env(world)
    order_id, _ = next(fresh.db.scan("orders", status="pending"))
    read = ("get_order_details", {"order_id": order_id})
    cancel = ("cancel_pending_order", {"order_id": order_id, "reason": "no longer needed"})
    writer = Env(world)
    before, cancelled, after = fresh.call(*read), writer.call(*cancel), writer.call(*read)
    assert json.loads(after)["status"] == "cancelled"
    missing = fresh.call("get_order_details", {})  # tau-bench's TypeError text

    async def main():
        async with connect("--domain", "retail") as (session, info):
            assert info.instructions == world.policy
            policy = await session.read_resource("policy://retail")
            assert policy.contents[0].text == world.policy

            tools = (await session.list_tools()).tools
            expected = [s["function"] for s in fresh.tools]
            assert [(t.name, t.description, t.input_schema) for t in tools] == [
                (f["name"], f["description"], f["parameters"]) for f in expected]

            assert await call(session, *read) == (before, False)
            assert await call(session, *cancel) == (cancelled, False)
            # The write lives in this episode's database...
            assert await call(session, *read) == (after, False)
            # ...and nowhere else: a second server starts from the initial database.
            async with connect("--domain", "retail") as (other, _):
                assert await call(other, *read) == (before, False)

            assert await call(session, "get_order_details", {}) == (missing, True)
            assert await call(session, "no_such_tool", {}) == (
                "Unknown action no_such_tool", True)
            assert await call(session, *cancel) == (
                "Error: non-pending order cannot be cancelled", True)
            assert await call(session, *read) == (after, False)

    run(main)


def test_result_scores_gold_actions(synthetic, tmp_path):
    world, tasks = synthetic
    index = next(i for i, t in enumerate(tasks)
                 if any(a.name in world.spec.write_tools for a in t.actions))
    task, out = tasks[index], tmp_path / "result.json"

    async def main():
        async with connect("--task-index", str(index), "--result", str(out)) as (session, _):
            for action in task.actions:
                await session.call_tool(action.name, action.kwargs)

    run(main)
    result = json.loads(out.read_text())
    assert result["task_id"] == task.task_id
    assert [c[0] for c in result["calls"]] == [a.name for a in task.actions]
    assert result["written_calls"]
    assert result["reward_tarl"] == 1.0


def test_taubench_retail_tools(taubench_dir):
    data = taubench_dir / "v1" / "retail"
    expected = json.loads((data / "tools.json").read_text())

    async def main():
        async with connect("--domain", "retail", "--data", str(data),
                           "--tasks", str(data / "tasks_test.json")) as (session, _):
            tools = (await session.list_tools()).tools
            assert [t.name for t in tools] == [s["function"]["name"] for s in expected]
            assert [t.input_schema for t in tools] == [
                s["function"]["parameters"] for s in expected]
            text, error = await call(session, "find_user_id_by_email",
                                     {"email": "noah.brown7922@example.com"})
            assert (text, error) == ("noah_brown_6181", False)

    run(main)
