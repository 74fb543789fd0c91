"""The paper's text setting: Qwen3-8B on tau-bench retail with an LLM user and an LLM judge.

    python -m tarl_jax.main --config=configs/qwen3_8b_retail.py --workdir=/mnt/shared/qwen3_8b \
        --config.model.hf_dir=/path/to/Qwen3-8B --config.world.data_dir=/path/to/taubench \
        --config.user.base_url=http://USER_HOST/v1 --config.judge.llm.base_url=http://JUDGE_HOST/v1

GRPO, 32 tasks x 4 rollouts, temperature 0.7, top-p 0.95, actor lr 1e-6 (critic 1e-5 for
algo=ppo), prompt 4096 / response 1024 tokens; tau-bench's own retail policy and full tool
schemas; the 500 retail train tasks for training, the 115 test tasks for pass^1. Arguments as in
configs/tiny.py (e.g. `:algo=ppo,credit=per_turn,math=0.5`).
"""
import pathlib

from tarl_jax import configlib


def get_config(arg: str | None = None):
    c = configlib.load(str(pathlib.Path(__file__).with_name("tiny.py")), arg)
    c.total_steps, c.eval_every, c.checkpoint_every = 200, 20, 10
    c.model.update(preset="qwen3-8b", tokenizer="qwen3", dtype="bfloat16", scan_layers=True,
                   remat="dots_no_batch", attn_chunk=1024)  # 12k-token rows: blocked attention
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.world.update(source="taubench", data_dir=c.world.data_dir or "../shared/taubench",
                   eval_tasks=115, tool_view="full", reward_variant="tarl", max_steps=30,
                   system_prompt="")
    c.math.update(source="reasoning_gym:gsm_symbolic", size=2000)
    c.user.update(kind="llm", model="gpt-4.1", temperature=1.0)
    c.judge.kind = "llm" if c.judge.kind == "rule" else c.judge.kind
    c.judge.llm.update(model="gpt-4.1", max_concurrency=32)
    # Sized for a v5p-64 (32 chips, 8 hosts) by `python -m launch.compile` (README): each host
    # samples on its 4 chips (the policy and KV cache cut by heads), 32 episodes at a time
    # (54 GiB of 95 in prefill), and each microbatch gives every chip one row (128 rows / 4 =
    # 32; set rl.microbatches = 128 / (data x fsdp) on other slices). 128 rows hold the step's
    # 128 episodes whole at 12288 tokens.
    c.rollout.update(tasks_per_step=32, samples_per_task=4, temperature=0.7, top_p=0.95,
                     max_turn_tokens=1024, cache_len=4096 + 8192, eval_samples=4, max_rows=32,
                     tensor=-1)
    c.rl.update(logprob_chunk=16384, microbatches=4)
    c.pack.update(seq_lens=(8192, 12288), rows=(128,))
    c.optim.update(lr=1e-6, critic_lr=1e-5, warmup_steps=5, schedule="constant")
    c.warmstart.steps = 0
    return c
