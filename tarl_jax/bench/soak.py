"""Soak: thousands of sandbox episodes, then hundreds of served requests, in one process, with
resident memory, threads and open file descriptors sampled as they go. A leak shows as growth
after the warm-up; the run fails (exit 1) if any grows past the stated margin.

    python -m tarl_jax.bench.soak [--episodes 3000] [--requests 300] [--margin 0.10]

Episodes: the synthetic tau-bench-shaped world (level 2), the scripted expert against the
offline user, each in its own fresh SQLite copy, 8 at a time on threads (`run_episodes`, as
rollouts run them). Requests: `serve.build` of the tiny preset (random weights) on 127.0.0.1,
8 client threads sending chat requests of up to 16 new tokens. The first fifth of each phase is
the warm-up (imports, caches, compilation, the allocator's per-thread arenas); growth is the
largest sample after it relative to the sample that ends it. Results in the README with the
command.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time

WARMUP = 0.2   # share of a phase's samples that are warm-up


def sample() -> dict:
    """This process's resident set (MiB), threads and open file descriptors."""
    rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status")
                   if line.startswith("VmRSS:"))
    return {"rss_mib": rss_kib / 1024, "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd"))}


def soak_episodes(total: int, blocks: int) -> list[dict]:
    from tarl_jax.sandbox import synth
    from tarl_jax.sandbox.env import Env
    from tarl_jax.sandbox.episode import run_episodes
    from tarl_jax.sandbox.user import OfflineUser
    world, tasks = synth.make_world(synth.SynthConfig(num_tasks=400, level=2))
    per, done, out = max(total // blocks, 1), 0, []
    while done < total:
        batch = [tasks[(done + i) % len(tasks)] for i in range(min(per, total - done))]
        eps = run_episodes(batch, lambda t: Env(world, t), synth.ExpertAgent,
                           lambda t, env: OfflineUser(t, world), workers=8)
        done += len(batch)
        out.append({"done": done, "solved": sum(ep.reward >= 1 for ep in eps) / len(eps), **sample()})
        print(f"episodes {done:6d}: {out[-1]}", flush=True)
    return out


def soak_requests(total: int, blocks: int) -> list[dict]:
    import openai

    from tarl_jax import components, serve
    tok, cfg, params = components.load_model({"preset": "tiny", "tokenizer": "tiny"}, seed=0)
    srv = serve.build(tok, cfg, params, cache_len=512, port=0, max_tokens=16).start()
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=120)
        r = local.client.chat.completions.create(
            model="tarl", max_tokens=16, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": f"Where is my order #W{1000 + i}?"}])
        return r.usage.completion_tokens

    per, done, out = max(total // blocks, 1), 0, []
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while done < total:
                n = min(per, total - done)
                tokens = sum(pool.map(one, range(done, done + n)))
                done += n
                out.append({"done": done, "tokens": tokens, **sample()})
                print(f"requests {done:5d}: {out[-1]}", flush=True)
    finally:
        srv.close()
    return out


def growth(samples: list[dict]) -> dict:
    """Largest relative growth of each resource after the warm-up, from the sample ending it."""
    cut = max(round(WARMUP * len(samples)), 1) - 1
    base, after = samples[cut], samples[cut + 1:] or samples[cut:]
    return {k: max(s[k] for s in after) / base[k] - 1 for k in ("rss_mib", "threads", "fds")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=3000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=10, help="samples per phase")
    ap.add_argument("--margin", type=float, default=0.10,
                    help="allowed relative growth after the warm-up block")
    ap.add_argument("--json", help="also write the samples here")
    args = ap.parse_args(argv)
    t0 = time.time()
    report = {"episodes": soak_episodes(args.episodes, args.blocks) if args.episodes else [],
              "requests": soak_requests(args.requests, args.blocks) if args.requests else []}
    report["growth"] = {phase: growth(report[phase]) for phase in ("episodes", "requests")
                        if report[phase]}
    report["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    bad = {f"{phase}/{k}": round(v, 3) for phase, g in report["growth"].items()
           for k, v in g.items() if v > args.margin}
    print(json.dumps({"growth": report["growth"], "seconds": round(report["seconds"]),
                      "over_margin": bad}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
