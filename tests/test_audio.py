"""Whisper log-mel parity with transformers' WhisperFeatureExtractor (numpy path), and chunk layout."""
import numpy as np
import pytest

from tarl_jax.models import audio

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fe():
    return transformers.WhisperFeatureExtractor(feature_size=128)


def speechy(n, seed=0):
    """A voiced-like tone with syllable-rate modulation over noise: a wide dynamic range."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / audio.SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)
    return x.astype(np.float32)


def reference(fe, wave):
    """The extractor as the Qwen2.5-Omni processor runs it: zero-padded (or cut) to 30 s, numpy STFT;
    valid frames from its attention mask."""
    buf = np.zeros(audio.MAX_SAMPLES, np.float32)
    n = min(len(wave), audio.MAX_SAMPLES)
    buf[:n] = wave[:n]
    mask = fe(wave, sampling_rate=16000, return_attention_mask=True)["attention_mask"][0]
    return fe._np_extract_fbank_features(buf[None], "cpu")[0], int(mask.sum())


def test_mel_filters_match(fe):
    assert np.abs(audio.mel_filters() - fe.mel_filters).max() < 1e-7


def test_log_mel_30s_padded(fe):
    waves = np.zeros((2, audio.MAX_SAMPLES), np.float32)
    waves[0, :100_000] = speechy(100_000)
    waves[1] = speechy(audio.MAX_SAMPLES, seed=1)
    ref = fe._np_extract_fbank_features(waves, "cpu")
    ours = np.asarray(audio.log_mel(waves, np.full(2, audio.MAX_SAMPLES, np.int32)))
    assert ours.shape == ref.shape == (2, 128, 3000)
    diff = np.abs(ours - ref).max()
    print(f"log-mel 30 s padded max|diff| = {diff:.2e}")
    assert diff < 1e-4


def test_log_mel_variable_length(fe):
    # Each batch is bucketed to its longest member: short rows sit in a larger buffer than they
    # need, the longest in the smallest exact one. Lengths: on a hop, odd, past a 2 s chunk edge,
    # alone in the minimal bucket, just under 30 s, over 30 s (truncated).
    batches = [[16_000, 12_345, 32_077], [12_345], [479_990, 600_000]]
    worst = 0.0
    for lengths in batches:
        waves = [speechy(n, seed=n) for n in lengths]
        feats, frames = audio.features(waves)
        assert feats.shape[-1] % 200 == 0
        for row, wave in enumerate(waves):
            ref, valid = reference(fe, wave)
            assert frames[row] == valid
            worst = max(worst, np.abs(np.asarray(feats)[row, :, :valid] - ref[:, :valid]).max())
    print(f"log-mel variable length max|diff| = {worst:.2e}")
    assert worst < 1e-4


def test_chunk_layout_and_token_counts():
    frames = np.array([300, 271, 3000, 1])
    # Values of the processor's _get_feat_extract_output_lengths (a 1-frame utterance gives none).
    assert list(audio.output_tokens(frames)) == [75, 68, 750, 0]
    src, lens = audio.chunk_plan(frames, 3000, 200)
    assert len(src) == 32  # 2 + 2 + 15 + 1 = 20 chunks, padded to a power of two
    assert list(lens[:5]) == [200, 100, 200, 71, 200] and lens[19] == 1 and not lens[20:].any()
    assert list(src[:5]) == [0, 1, 15, 16, 30]
    feats = np.arange(4 * 2 * 3000, dtype=np.float32).reshape(4, 2, 3000)
    chunks = np.asarray(audio.take_chunks(feats, src, 200))
    np.testing.assert_array_equal(chunks[3], feats[1, :, 200:400])
