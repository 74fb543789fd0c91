"""The paper's speech setting: the Qwen2.5-Omni-7B thinker on tau-bench retail, users that speak.

    python -m tarl_jax.main --config=configs/omni_7b_speech.py --workdir=/mnt/shared/omni7b \\
        --config.model.hf_dir=/path/to/Qwen2.5-Omni-7B --config.world.data_dir=/path/to/taubench \\
        --config.user.base_url=http://USER_HOST/v1 --config.judge.llm.base_url=http://JUDGE_HOST/v1

The thinker (audio encoder + Qwen2.5-7B decoder) loads from the Omni checkpoint (`thinker.*`;
talker and vision weights are skipped); the audio encoder is frozen and each utterance's
embeddings are computed once and shared by the G samples and every log-prob pass; the decoder
is the policy. Curriculum as in the paper: a short text warm-up, then math, text and speech
batches in turn (text-only training erodes the speech ability). The simulated user's turns are
synthesised by an OpenAI-compatible speech endpoint (`--config.speech.engine=espeak-ng` for an
offline voice); `:noise` adds telephone band-limiting at 15 dB SNR (tau2's voice conditions).
pass^1 is reported for text and speaking users side by side.

Chat format: the tokenizer renders Qwen3's template (tools in the system prompt, <tool_call>
blocks), which Qwen2.5's tool format matches; Omni's own template has no tools section.
Arguments as in configs/tiny.py.
"""
import pathlib

from tarl_jax import configlib


def get_config(arg: str | None = None):
    args = [a for a in (arg or "").split(",") if a]
    c = configlib.load(str(pathlib.Path(__file__).with_name("qwen3_8b_retail.py")),
                       ",".join(a for a in args if a != "noise") or None)
    # preset: the decoder's shape where no checkpoint is read (launch.compile); runs take
    # the shape and weights from model.hf_dir.
    c.model.update(audio="hf", tokenizer="hf", preset="qwen2.5-7b", dtype="bfloat16")
    c.curriculum.update(warmup_steps=10, warmup_schedule="text", schedule="math,text,speech")
    c.speech.update(engine="openai", cache_dir="", max_items=1024)   # 7B: ~1 MB per utterance
    if "noise" in args:
        c.speech.update(snr_db=15.0, telephony=True)
    # Spoken turns cost 25 tokens a second: a longer context than the text setting.
    c.rollout.update(cache_len=4096 + 12288)
    c.pack.update(seq_lens=(8192, 12288, 16384))
    return c
