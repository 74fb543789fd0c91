"""Gold-replay episodes per second of the SQLite sandbox vs tau-bench's own environment.

    python -m tarl_jax.bench.sandbox [--data ../shared/taubench] [--tau-bench DIR] [--seconds 3]

An episode = a fresh database (tau-bench: reload the JSON files), the task's gold actions as
tool calls, the required outputs said once, and tau-bench's reward. tau-bench's reward replays
the gold actions on another fresh copy and hashes both whole databases; we replay gold once
per task (cached: replays are deterministic) and compare only the records either side wrote.
"cold" clears that cache before every episode, paying the gold replay each time.

The peer: with --tau-bench (a checkout of sierra-research/tau-bench) its environment runs in
this process on the same machine and tasks (its LLM user is stubbed out: gold episodes never
call it), and the rewards of both are compared task by task. Without it, the ratio is against
tau-bench's rate measured earlier on this machine: 2.8 episodes/s retail, 1.25 airline.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import types

from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.tasks import load_tasks

TAU_BENCH_EPISODES_PER_S = {"retail": 2.8, "airline": 1.25}
DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "taubench"


def episode(world: World, task) -> float:
    env = Env(world, task)
    for action in task.actions:
        env.call(action.name, action.kwargs)
    return env.reward(task.outputs)[0]


def rate(world: World, tasks, seconds: float, cold: bool) -> tuple[float, list[float]]:
    """Episodes per second over whole passes through `tasks`, and the last pass's rewards."""
    n, start = 0, time.perf_counter()
    while True:
        rewards = []
        for task in tasks:
            if cold:
                world.gold_cache.clear()
            rewards.append(episode(world, task))
        n += len(tasks)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, rewards


def peer_rate(checkout: str, domain: str, seconds: float) -> tuple[float, list[float]]:
    """tau-bench's own env: reset (its reset minus the user) + gold steps + its reward, over
    its test tasks in order until `seconds` have passed; the rewards of the tasks it ran."""
    sys.path.insert(0, checkout)
    sys.modules.setdefault("litellm", types.SimpleNamespace(completion=None))
    import tau_bench.envs.base as base
    from tau_bench.types import Action
    base.load_user = lambda **kwargs: None
    if domain == "retail":
        from tau_bench.envs.retail.env import MockRetailDomainEnv as Peer
    else:
        from tau_bench.envs.airline.env import MockAirlineDomainEnv as Peer
    env, rewards, start = Peer(task_index=0), [], time.perf_counter()
    for i, task in enumerate(env.tasks):
        env.task_index, env.task, env.actions = i, task, []
        env.data = env.data_load_func()
        for action in task.actions:
            if action.name not in env.terminate_tools:
                env.step(action)
        env.actions.append(Action(name="respond", kwargs={"content": " ".join(task.outputs)}))
        rewards.append(env.calculate_reward().reward)
        if time.perf_counter() - start >= seconds:
            break
    return len(rewards) / (time.perf_counter() - start), rewards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="tau-bench data root")
    parser.add_argument("--tau-bench", help="tau-bench checkout to measure as the peer")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per figure")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.data)
    for domain, quoted in TAU_BENCH_EPISODES_PER_S.items():
        world = World.from_dir(domain, root / "v1" / domain)
        tasks = load_tasks(root / "v1" / domain / "tasks_test.json", domain)
        peer, label = quoted, f"tau-bench's {quoted} /s measured earlier"
        if args.tau_bench:
            peer, peer_rewards = peer_rate(args.tau_bench, domain, args.seconds)
            _, ours = rate(world, tasks, 0, cold=False)
            same = sum(a == b for a, b in zip(ours, peer_rewards))
            label = f"tau-bench's {peer:.2f} /s now"
            print(f"{domain:8s} rewards equal to tau-bench's on {same}/{len(peer_rewards)} tasks")
        for cold in (True, False):
            eps, rewards = rate(world, tasks, args.seconds, cold)
            print(f"{domain:8s} {'cold' if cold else 'warm'}: {eps:7.1f} episodes/s "
                  f"= {eps / peer:6.1f}x {label}; "
                  f"gold reward 1 on {sum(r == 1.0 for r in rewards)}/{len(tasks)} tasks")


if __name__ == "__main__":
    main()
