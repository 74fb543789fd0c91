"""The warm start's SFT batches (sft.Demonstrations.batch): whole expert dialogues packed into
warmstart.batch_rows rows, and one row each when a draw of long ones needs more (level 1: 8
dialogues of up to 3.4k tokens in 4 x 4096 rows)."""
import jax
import numpy as np

from tarl_jax import components, configlib, limits, sft, sharding
from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
from tarl_jax.rl import batch as batch_lib


def test_long_draws_get_a_row_each_and_short_ones_share_rows():
    c = configlib.load("configs/tiny.py", "level=1")
    world = components.build_world(c)
    tok = ChatTokenizer(tiny_tokenizer_dir())
    eps = limits.expert_episodes(world, tok, components.tool_view(c), world.train[:60])
    eps = sorted((e for e in eps if e.reward >= 1), key=lambda e: -limits.fit(e)["tokens"])
    demos = sft.Demonstrations.__new__(sft.Demonstrations)
    demos.c, demos.speech, demos.audio_id = c.warmstart, None, None
    demos.mesh, demos.rules = sharding.make_mesh(devices=jax.devices()[:1]), sharding.DEFAULT_RULES
    demos.keys = batch_lib.batch_keys()
    w = c.warmstart
    assert (w.dialogues, w.batch_rows, w.seq_len) == (8, 4, 4096)
    for chosen, rows in ((eps[:8], 8), (eps[-8:], 4)):
        demos.solved = chosen
        b = demos.batch(np.random.default_rng(0), 0)
        lengths = [limits.fit(e)["tokens"] for e in chosen]
        assert b["tokens"].shape == (rows, 4096), (b["tokens"].shape, lengths)
        # Every dialogue whole: the policy tokens of the batch are all of the chosen ones'.
        want = sum(len(t.token_ids) for e in chosen for t in e.agent_turns)
        assert int(np.asarray(b["loss_mask"]).sum()) == want - sum(
            1 for e in chosen if not e.agent_turns[0].prompt_ids)
