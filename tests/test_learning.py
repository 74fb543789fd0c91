"""Learning, not just running: GRPO through the real sampler, packing and train step raises
the reward of a toy task (reward = share of generated tokens equal to TARGET)."""
import jax
import numpy as np

from tarl_jax import sharding
from tarl_jax.models import qwen
from tarl_jax.rl import advantages, losses, pack
from tarl_jax.rl import step as step_lib
from tarl_jax.sampler import Sampler
from tarl_jax.sandbox.record import AgentTurn, Episode

CFG = qwen.DecoderConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=True,
                         tie_embeddings=True)
TARGET, GROUPS, G, NEW = 5, 8, 4, 6


def test_grpo_raises_reward_on_toy_task():
    mesh = sharding.make_mesh()
    opt = step_lib.make_optimizer(1e-2)
    sh = step_lib.state_shardings(CFG, opt, False, mesh)
    state = step_lib.init_state(qwen.init_params(CFG, jax.random.key(0)), opt, CFG, False, sh)
    cfg = step_lib.StepConfig(loss=losses.LossConfig(policy_loss="ppo"), logprob_chunk=32)
    train = step_lib.jit_train_step(CFG, cfg, opt, mesh, sh, step_lib.BATCH_KEYS)
    sampler = Sampler(CFG, state["params"]["policy"], cache_len=16)
    rng = np.random.default_rng(0)
    history = []
    for step in range(30):
        prompts = [list(rng.integers(6, 32, 3)) for _ in range(GROUPS) for _ in range(G)]
        sampler.params = state["params"]["policy"]
        outs = sampler.generate(prompts, max_new_tokens=NEW, temperature=1.0, seed=step)
        rewards = np.array([np.mean(np.array(o.tokens) == TARGET) for o in outs], np.float32)
        history.append(float(rewards.mean()))
        episodes = [Episode(task_id=str(i // G), domain="toy", turns=[AgentTurn(
            0, {"role": "assistant"}, prompt_ids=p, token_ids=o.tokens, logprobs=o.logprobs)])
            for i, (p, o) in enumerate(zip(prompts, outs))]
        adv = advantages.compute_advantages("grpo", rewards, np.repeat(np.arange(GROUPS), G))
        batch = pack.pack(episodes, np.asarray(adv), seq_lens=(16,), rows=(GROUPS * G,)).arrays
        state, _ = train(state, step_lib.device_batch(batch, step_lib.BATCH_KEYS, mesh),
                         jax.random.key(step))
    start, end = np.mean(history[:5]), np.mean(history[-5:])
    print(f"mean reward: first 5 steps {start:.3f}, last 5 steps {end:.3f}")
    assert end > start + 0.3, history
