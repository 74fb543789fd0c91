"""TTS engines, the on-disk cache and acoustic conditions."""
import http.server
import io
import json
import os
import shutil
import threading
import wave

import numpy as np
import pytest

from tarl_jax.sandbox import speech

SR = speech.SAMPLE_RATE
TEXT = "Hi, I would like to return the blue water bottle from my last order."  # 14 words


def need(binary):
    """Offline engines are Debian packages: skip where absent, but CI must have them."""
    if shutil.which(binary) is None:
        msg = f"{binary} not installed (apt-get install -y {binary})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.parametrize("engine", ["espeak-ng", "flite"])
def test_offline_engine_gives_16k_float32_speech(engine, tmp_path):
    need(engine)
    tts = speech.TTS(engine, cache_dir=tmp_path)
    voice = speech.voice_for_user(tts.engine, "user_42")
    assert voice == speech.voice_for_user(tts.engine, "user_42")  # stable per user
    x = tts(TEXT, voice)
    assert x.dtype == np.float32 and x.ndim == 1
    seconds = len(x) / SR
    assert 2.0 < seconds < 10.0, seconds  # ~14 words at 130-200 words per minute
    assert np.sqrt(speech.power(x)) > 0.01

    again = speech.TTS(engine, cache_dir=tmp_path)  # a fresh instance finds the disk cache
    np.testing.assert_array_equal(again(TEXT, voice), x)
    noisy = again(TEXT, voice, speech.Conditions(snr_db=10.0))  # conditions are part of the key
    assert noisy.shape == x.shape and not np.array_equal(noisy, x)
    fresh = speech.TTS(engine, cache_dir=tmp_path)
    np.testing.assert_array_equal(fresh(TEXT, voice, speech.Conditions(snr_db=10.0)), noisy)
    assert (again.hits, again.misses) == (1, 1) and len(list(tmp_path.glob("*.npy"))) == 2


def pitch_hz(x):
    """Median autocorrelation pitch of the voiced 40 ms frames."""
    found = []
    for s in range(0, len(x) - 640, 320):
        frame = x[s:s + 640]
        if speech.power(frame) > 4e-4:
            ac = np.correlate(frame, frame, "full")[639:]
            lo, hi = SR // 400, SR // 60
            found.append(SR / (lo + np.argmax(ac[lo:hi])))
    return np.median(found)


@pytest.mark.parametrize("engine,name", [("espeak-ng", "en-us+m1"), ("flite", "slt")])
def test_voice_rate_and_pitch(engine, name, tmp_path):
    need(engine)
    tts = speech.TTS(engine, cache_dir=tmp_path)
    say = lambda **kw: tts("Hello there, I would like to return an item please.", speech.Voice(engine, name, **kw))
    assert len(say(rate=0.8)) > 1.3 * len(say(rate=1.25))
    assert pitch_hz(say(pitch=1.2)) > 1.1 * pitch_hz(say(pitch=0.8))
    assert (tts.hits, tts.misses) == (0, 4)


def test_missing_engine_names_the_debian_package(monkeypatch, tmp_path):
    with pytest.raises(speech.EngineMissing, match=r"apt-get install -y espeak-ng"):
        speech.TTS(speech.EspeakNG(binary="espeak-ng-not-here"))("hello")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(speech.EngineMissing, match=r"'flite'"):
        speech.TTS("flite")("hello")


def tone_mix(n=3 * SR, seed=0):
    """Broadband test signal: harmonics up to 7 kHz plus a little noise."""
    t = np.arange(n) / SR
    x = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate([150, 700, 2500, 4500, 7000], 1))
    return (0.2 * x + 0.01 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("drift", [0.0, 3.0])
def test_noise_at_snr(drift):
    x = tone_mix()
    y = speech.apply_conditions(x, speech.Conditions(snr_db=10.0, snr_drift_db=drift, seed=1))
    snr = 10 * np.log10(speech.power(x) / speech.power(y - x))
    assert abs(snr - 10.0) < 1.0, snr


def band_energy(x, lo, hi):
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return spec[(f >= lo) & (f <= hi)].sum()


def test_telephony_band_limit():
    x = tone_mix()
    y = speech.apply_conditions(x, speech.Conditions(telephony=True))
    assert band_energy(x, 3500, 8000) > 0.05 * band_energy(x, 0, 8000)
    assert band_energy(y, 3450, 8000) < 1e-9 * band_energy(y, 0, 8000)
    assert band_energy(y, 0, 250) < 1e-9 * band_energy(y, 0, 8000)
    assert band_energy(y, 500, 3000) > 0.99 * band_energy(x, 500, 3000)


def test_frame_drops_and_muffling():
    x = tone_mix(20 * SR)
    y = speech.apply_conditions(x, speech.Conditions(drop_rate=0.05, drop_ms=100, seed=3))
    lost = np.mean(y == 0)
    assert 0.01 < lost < 0.12, lost  # expected 5% (overlaps and Poisson counts vary)
    z = speech.apply_conditions(x, speech.Conditions(muffle_prob=1.0, muffle_ms=500, seed=3))
    changed = np.abs(z - x) > 1e-3
    span = np.flatnonzero(changed)
    assert 0.4 * SR < span[-1] - span[0] < 0.75 * SR  # one 0.5 s segment plus its ramps


def test_conditions_from_tau2(taubench_dir):
    cfgs = json.loads((taubench_dir / "tau2" / "retail" / "tasks_voice.json").read_text())["configs"]
    task = next(iter(cfgs.values()))["configs"]
    regular, control = speech.Conditions.from_tau2(task["regular"]), speech.Conditions.from_tau2(task["control"])
    assert regular.snr_db == 15.0 and regular.telephony and regular.drop_rate == 0.02 and regular.muffle_prob > 0
    assert control.snr_db is None and control.drop_rate == 0 and control.muffle_prob == 0


class _SpeechHandler(http.server.BaseHTTPRequestHandler):
    """Minimal /v1/audio/speech: a 1 s 440 Hz tone at 24 kHz, as wav or raw pcm."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        t = np.arange(24_000) / 24_000
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
        if body["response_format"] == "wav":
            buf = io.BytesIO()
            with wave.open(buf, "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(24_000), w.writeframes(pcm)
            pcm = buf.getvalue()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(pcm)))
        self.end_headers()
        self.wfile.write(pcm)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_openai_compatible_endpoint(fmt):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SpeechHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tts = speech.TTS("openai", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="x",
                            response_format=fmt)
        x = tts("hello", speech.voice_for_user(tts.engine, "u1"))
    finally:
        server.shutdown()
    assert x.dtype == np.float32 and abs(len(x) - SR) <= 1
    peak = np.argmax(np.abs(np.fft.rfft(x))) * SR / len(x)
    assert abs(peak - 440) < 2
