"""One episode's sandbox served over the Model Context Protocol (stdio), the way the TARL paper
gives its agent tau-bench's tools.

    python -m tarl_jax.sandbox.mcp --domain retail [--synthetic-seed 0]
    python -m tarl_jax.sandbox.mcp --domain airline --data DIR [--tasks FILE]
        [--task-index N] [--result OUT.json]

The server owns one `Env` on a fresh fork of the world: every process starts from the initial
database, and a session's writes stay visible to its later calls. Tools keep tau-bench's exact
names, descriptions and JSON schemas (the OpenAI `parameters` become the MCP `inputSchema`). A
call answers `Env.call`'s string as text; tool errors stay tau-bench's error strings, with
`isError` set where the answer starts with "Error" or the tool does not exist. The policy is the
server's `instructions` and the resource `policy://<domain>`.

The task's gold actions and the reward never reach the agent: with `--result` the episode's
calls and its TARL outcome (write calls equal gold's) go to a file when the session ends (the
client closing stdin). tau-bench's own outcome also needs what the agent said, which a tool
server never sees: the harness, which holds the dialogue, can replay the recorded calls.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import anyio
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from tarl_jax.sandbox import synth
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.tasks import Task, load_tasks


def build_server(env: Env) -> Server:
    tools = [types.Tool(name=f["name"], description=f["description"], input_schema=f["parameters"])
             for f in (schema["function"] for schema in env.tools)]
    names = {t.name for t in tools}
    policy_uri = f"policy://{env.world.domain}"

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        # No await inside: concurrent requests cannot interleave within one tool call.
        out = env.call(params.name, params.arguments)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=out)],
            is_error=params.name not in names or out.startswith("Error"))

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[types.Resource(
            uri=policy_uri, name="policy", mime_type="text/markdown",
            description=f"The {env.world.domain} agent policy (tau-bench's system prompt).")])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams
                            ) -> types.ReadResourceResult:
        if str(params.uri) != policy_uri:
            raise ValueError(f"unknown resource {params.uri} (known: {policy_uri})")
        return types.ReadResourceResult(contents=[types.TextResourceContents(
            uri=policy_uri, mime_type="text/markdown", text=env.policy)])

    return Server(f"tarl-{env.world.domain}", instructions=env.policy,
                  on_list_tools=list_tools, on_call_tool=call_tool,
                  on_list_resources=list_resources, on_read_resource=read_resource)


async def serve_stdio(env: Env) -> None:
    server = build_server(env)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def episode_result(env: Env) -> dict:
    result = {"task_id": env.task.task_id if env.task else None,
              "calls": [[c.name, c.kwargs, c.observation] for c in env.calls],
              "written_calls": env.written_calls()}
    if env.task is not None:
        result["reward_tarl"], _ = env.reward(variant="tarl")
    return result


def load(args: argparse.Namespace) -> tuple[World, list[Task]]:
    if args.data is None:
        if args.domain != "retail":
            raise SystemExit(f"the synthetic world is retail only: pass --data for {args.domain}")
        return synth.make_world(synth.SynthConfig(seed=args.synthetic_seed))
    world = World.from_dir(args.domain, args.data)
    return world, load_tasks(args.tasks, args.domain) if args.tasks else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="retail", choices=["retail", "airline"])
    parser.add_argument("--data", help="tau-bench v1 / tau2 domain dir (default: synthetic)")
    parser.add_argument("--tasks", help="tasks JSON for --data (v1 list or tau2 tasks.json)")
    parser.add_argument("--synthetic-seed", type=int, default=0)
    parser.add_argument("--task-index", type=int, default=0)
    parser.add_argument("--result", help="write the episode's calls and reward here at exit")
    args = parser.parse_args(argv)
    world, tasks = load(args)
    env = Env(world, tasks[args.task_index] if tasks else None)
    anyio.run(serve_stdio, env)
    if args.result:
        with open(args.result, "w") as f:
            json.dump(episode_result(env), f)


if __name__ == "__main__":
    main()
