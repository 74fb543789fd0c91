"""Speech-path costs: TTS real-time factor, log-mel throughput vs transformers, encoder cache.

    python -m tarl_jax.bench.speech [--utterances 16] [--group 4] [--passes 3] [--encoder small|real]

TTS: real-time factor (synthesis seconds / audio seconds; < 1 is faster than real time) of each
installed engine on the same user sentences, then of tau2's "regular" acoustic conditions, and of
an on-disk cache hit. An OpenAI-compatible endpoint is included when --openai-url is given.

Log-mel: audio seconds per wall second of our jitted `audio.log_mel` (bucketed buffers) and of
transformers' WhisperFeatureExtractor called as the Qwen2.5-Omni processor calls it (30 s
padding; its torch STFT path, and its numpy path), plus its torch path padded only to the
longest utterance (equal work), on the same utterances (2-10 s).

Encoder: a GRPO step hears each utterance --group times (one per sample) in --passes forward
passes (rollout prefill, policy log-probs, reference log-probs). Without the cache every pass
encodes every copy; with `omni.AudioEmbeddingCache` (frozen encoder) each distinct utterance is
encoded once and later passes are lookups. Timings are the best of --repeats after a warm-up
(compilation excluded and printed separately).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time

import jax
import numpy as np

from tarl_jax.bench import best_time
from tarl_jax.models import audio, omni, qwen
from tarl_jax.sandbox import speech

SENTENCES = [
    "Hi, I'd like to return the water bottle I got last week.",
    "Sure, my email is yusuf underscore rossi at example dot com.",
    "The order number is W, two, three, eight, four, nine, five, one.",
    "Actually, could you exchange the blue one for the red one instead?",
    "Yes, please go ahead and use the credit card on file.",
    "Um, I also want to change the shipping address to my office, if that's possible.",
    "No, that's everything. Thanks a lot for your help today!",
    "Wait, how long will the refund take to show up on my statement?",
]


def bench_tts(args):
    engines = [e for e in ("espeak-ng", "flite") if shutil.which(e)]
    missing = sorted({"espeak-ng", "flite"} - set(engines))
    if missing:
        print(f"  (not installed, skipped: {missing}; apt-get install -y {' '.join(missing)})")
    made = {name: speech.TTS(name) for name in engines}
    if args.openai_url:
        made["openai"] = speech.TTS("openai", base_url=args.openai_url, model=args.openai_model)
    regular = speech.Conditions(snr_db=15.0, snr_drift_db=3.0, telephony=True, drop_rate=0.02, muffle_prob=0.2)
    waves = {}
    for name, tts in made.items():
        start = time.perf_counter()
        waves[name] = [tts(s, speech.voice_for_user(tts.engine, f"user{i}")) for i, s in enumerate(SENTENCES)]
        wall = time.perf_counter() - start
        secs = sum(len(w) for w in waves[name]) / speech.SAMPLE_RATE
        print(f"  {name:10s} RTF {wall / secs:.4f}  ({secs:.1f} s of audio in {wall:.2f} s)")
    if waves:
        clips = next(iter(waves.values()))
        secs = sum(len(w) for w in clips) / speech.SAMPLE_RATE
        start = time.perf_counter()
        for i, w in enumerate(clips):
            speech.apply_conditions(w, dataclasses.replace(regular, seed=i))
        print(f"  tau2 'regular' conditions RTF {(time.perf_counter() - start) / secs:.4f}")
        with tempfile.TemporaryDirectory() as d:
            name = next(iter(waves))
            tts = speech.TTS(name, cache_dir=d)
            voice = speech.voice_for_user(tts.engine, "user0")
            tts(SENTENCES[0], voice)
            start = time.perf_counter()
            hit = tts(SENTENCES[0], voice)
            print(f"  disk-cache hit RTF {(time.perf_counter() - start) / (len(hit) / speech.SAMPLE_RATE):.5f}")
    return next(iter(waves.values()), None)


def bench_log_mel(waves, repeats):
    import transformers

    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    secs = sum(len(w) for w in waves) / audio.SAMPLE_RATE
    buf, lengths = audio.pad_waves(waves)
    first, ours, _ = best_time(lambda: audio.log_mel(buf, lengths).block_until_ready(), repeats)
    _, torch_path, _ = best_time(lambda: fe(waves, sampling_rate=16000, return_attention_mask=True), repeats)
    _, longest, _ = best_time(lambda: fe(waves, sampling_rate=16000, padding="longest"), repeats)
    padded = np.zeros((len(waves), audio.MAX_SAMPLES), np.float32)
    for i, w in enumerate(waves):
        padded[i, :len(w)] = w[:audio.MAX_SAMPLES]
    _, numpy_path, _ = best_time(lambda: fe._np_extract_fbank_features(padded, "cpu"), 1)
    print(f"  ours (jit, {buf.shape[1] / audio.SAMPLE_RATE:.0f} s buckets): {secs / ours:9.0f} audio-s/s"
          f"  (compile {first - ours:.2f} s)")
    print(f"  WhisperFeatureExtractor torch path:  {secs / torch_path:9.0f} audio-s/s   ratio ours/theirs "
          f"{torch_path / ours:.2f}x")
    print(f"  same, padding='longest' (equal work): {secs / longest:9.0f} audio-s/s   ratio ours/theirs "
          f"{longest / ours:.2f}x")
    print(f"  WhisperFeatureExtractor numpy path:  {secs / numpy_path:9.0f} audio-s/s   ratio ours/theirs "
          f"{numpy_path / ours:.2f}x")


ENCODERS = {
    "small": dict(d_model=384, num_layers=4, num_heads=6, ffn_dim=1536, output_dim=512),
    "real": dict(d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120, output_dim=3584),  # Omni-7B
}


def bench_encoder(waves, args):
    acfg = audio.AudioConfig(**ENCODERS[args.encoder], dtype=args.dtype)
    text = qwen.DecoderConfig(vocab_size=8, hidden_size=acfg.output_dim, intermediate_size=8, num_layers=1,
                              num_heads=1, num_kv_heads=1, head_dim=8, model_type="qwen2")
    cfg = omni.ThinkerConfig(audio=acfg, text=text, freeze_audio=True)
    params = jax.jit(lambda k: audio.AudioEncoder(acfg).init(
        k, np.zeros((1, 128, acfg.window), np.float32), np.zeros((1,), np.int32))["params"])(jax.random.key(0))
    copies = [w for w in waves for _ in range(args.group)]

    def uncached():
        for _ in range(args.passes):
            mel, lens, _ = omni.audio_inputs(copies, cfg)
            out = omni.encode_stream(acfg, params, mel, lens)
        return out.block_until_ready()

    def cached():
        cache = omni.AudioEmbeddingCache(cfg, params)
        for _ in range(args.passes):
            out = cache.stream(copies)
        return out

    first_u, t_u, _ = best_time(uncached, args.repeats)
    first_c, t_c, _ = best_time(cached, args.repeats)
    n = len(waves)
    print(f"  encoder {args.encoder} ({acfg.num_layers} layers, d={acfg.d_model}, {args.dtype}) on "
          f"{jax.devices()[0].platform}: {n} utterances x {args.group} samples x {args.passes} passes")
    print(f"  without cache: {t_u:.3f} s   with cache: {t_c:.3f} s   speed-up {t_u / t_c:.1f}x   "
          f"(compile {first_u - t_u:.1f} s / {first_c - t_c:.1f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--utterances", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--openai-url", default=None)
    p.add_argument("--openai-model", default="gpt-4o-mini-tts")
    p.add_argument("--skip-tts", action="store_true")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    if not args.skip_tts:
        print("TTS real-time factor")
        bench_tts(args)
    # Log-mel and encoder inputs: speech-like noise bursts of 2-10 s (content does not matter).
    lengths = rng.integers(2 * audio.SAMPLE_RATE, 10 * audio.SAMPLE_RATE, args.utterances)
    waves = [(0.1 * rng.standard_normal(n) * np.sin(np.linspace(0, 20, n)) ** 2).astype(np.float32)
             for n in lengths]
    print(f"Log-mel throughput ({args.utterances} utterances, {lengths.sum() / audio.SAMPLE_RATE:.0f} s)")
    bench_log_mel(waves, args.repeats)
    print("Audio encoder per GRPO step")
    bench_encoder(waves, args)


if __name__ == "__main__":
    main()
