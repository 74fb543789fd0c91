"""Speech mode on a laptop CPU: the tiny policy with ears, users that speak (espeak-ng).

    python -m tarl_jax.main --config=configs/tiny_speech.py --workdir=runs/tiny_speech

configs/tiny.py plus a tiny Qwen2.5-Omni-style audio encoder (random, frozen) whose embeddings
replace the <|AUDIO|> placeholders of spoken user turns. The warm start imitates the expert on
text and on spoken dialogues alike; RL follows the paper's order in miniature: one text batch
(warm-up), then speech, text and math batches in turn. Held-out pass^1 is reported for text users
and for speaking users side by side (`pass^1`, `pass^1/speech`). Arguments as in configs/tiny.py,
plus `noise`: telephone-band audio at 15 dB SNR, like tau2's voice tasks.
"""
import pathlib

from tarl_jax import configlib


def get_config(arg: str | None = None):
    args = [a for a in (arg or "").split(",") if a]
    noisy = "noise" in args
    c = configlib.load(str(pathlib.Path(__file__).with_name("tiny.py")),
                       ",".join(a for a in args if a != "noise") or None)
    c.model.audio = "tiny"
    # A spoken turn costs 25 tokens a second, and espeak-ng reads an order id as a number
    # ("two billion one hundred ..."): a request naming two items and an order is ~700 tokens.
    # Rollouts get an 8k cache; updates see at most 4k tokens of an episode (the rest is cut
    # and counted in pack/truncated): attention scores are [T, T] per head in this CPU setting.
    c.rollout.cache_len = 8192
    c.pack.seq_lens = (2048, 4096)
    c.warmstart.seq_len = 4096
    c.model.attn_chunk = 512
    c.curriculum.update(warmup_steps=1, warmup_schedule="text", schedule="speech,text,math")
    if noisy:
        c.speech.update(snr_db=15.0, telephony=True)
    return c
