"""Text-to-speech for simulated users: 16 kHz mono float32, varied voices, telephone-like conditions.

Engines: `espeak-ng` and `flite` (offline, via subprocess; Debian packages of the same names) and
any OpenAI-compatible speech endpoint (`openai` client, `audio.speech.create`). Each simulated
user gets a seeded voice (`voice_for_user`): engine voice, speaking rate and pitch.

Acoustic conditions follow the knobs of tau2's voice tasks (`tasks_voice.json`; `Conditions.from_tau2`):
  noise      coloured noise mixed at `snr_db` over the utterance (tau2 plays recorded rooms; we
             have no recordings, so pink/brown/white noise), optionally drifting by
             `snr_drift_db` at `noise_variation_speed` Hz while the overall SNR stays `snr_db`;
  muffling   with probability `muffle_prob`, one `muffle_ms` segment low-passed at `muffle_hz`;
  telephony  the 300-3400 Hz telephone band;
  drops      bursts of `drop_ms` silence; `drop_rate` is the expected fraction of frames lost.
Order: muffle (speech) -> noise (source) -> band-limit and drops (channel).

Synthesis is cached on disk (one .npy per text + voice + conditions), so every rollout of a task
reuses its user's audio.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import wave
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16_000


class EngineMissing(RuntimeError):
    """A TTS program is not installed; the message names the Debian package."""


@dataclasses.dataclass(frozen=True)
class Voice:
    engine: str
    name: str           # the engine's voice (espeak-ng "en-us+f3", flite "slt", OpenAI "alloy")
    rate: float = 1.0   # speaking-rate factor
    pitch: float = 1.0  # pitch factor (the OpenAI endpoint has no pitch control and ignores it)


@dataclasses.dataclass(frozen=True)
class Conditions:
    snr_db: float | None = None      # None: no background noise
    noise: str = "pink"              # pink | brown | white
    snr_drift_db: float = 0.0
    noise_variation_speed: float = 0.5
    telephony: bool = False
    drop_rate: float = 0.0
    drop_ms: float = 150.0
    muffle_prob: float = 0.0
    muffle_ms: float = 500.0
    muffle_hz: float = 1500.0
    muffle_transition_ms: float = 100.0
    seed: int = 0

    @classmethod
    def from_tau2(cls, cfg: dict, seed: int = 0) -> "Conditions":
        """From one entry of tau2's tasks_voice.json (`configs[task]["configs"][level]`)."""
        src = cfg.get("source_effects_config") or {}
        chan = cfg.get("channel_effects_config") or {}
        sp = cfg.get("speech_effects_config") or {}
        return cls(
            snr_db=src.get("noise_snr_db", 15.0) if src.get("enable_background_noise") else None,
            snr_drift_db=src.get("noise_snr_drift_db", 0.0),
            noise_variation_speed=src.get("noise_variation_speed", 0.5),
            telephony=bool(cfg.get("telephony_enabled")),
            drop_rate=chan.get("frame_drop_rate", 0.0) if chan.get("enable_frame_drops") else 0.0,
            drop_ms=chan.get("frame_drop_duration_ms", 150.0),
            muffle_prob=sp.get("muffle_probability", 0.0) if sp.get("enable_dynamic_muffling") else 0.0,
            muffle_ms=sp.get("muffle_segment_duration_ms", 500.0),
            muffle_hz=sp.get("muffle_cutoff_freq", 1500.0),
            muffle_transition_ms=sp.get("muffle_transition_ms", 100.0),
            seed=seed)


# ----------------------------------------------------------------------------- signal helpers

def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain (whole utterances, so no streaming needed)."""
    if sr_in == sr_out or len(x) == 0:
        return x.astype(np.float32)
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n=n_out) * (n_out / len(x))
    return out.astype(np.float32)


def band(x: np.ndarray, lo: float, hi: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Keep only lo..hi Hz (an ideal filter: exactly nothing survives outside the band)."""
    spec = np.fft.rfft(x.astype(np.float64))
    f = np.fft.rfftfreq(len(x), 1.0 / sr)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, n=len(x)).astype(np.float32)


def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise with a 1/f^k spectrum: white k=0, pink k=1, brown k=2."""
    k = {"white": 0.0, "pink": 1.0, "brown": 2.0}.get(colour)
    if k is None:
        raise ValueError(f"noise colour {colour!r}: expected white, pink or brown")
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec[1:] /= f[1:] ** (k / 2)
    spec[0] = 0
    x = np.fft.irfft(spec, n=n)
    return x / np.sqrt(np.mean(x ** 2) + 1e-20)


def power(x) -> float:
    return float(np.mean(np.asarray(x, np.float64) ** 2))


def apply_conditions(x: np.ndarray, c: Conditions, rng: np.random.Generator | None = None) -> np.ndarray:
    """16 kHz float32 speech -> the same heard through conditions `c` (see the module docstring)."""
    rng = rng or np.random.default_rng(c.seed)
    x = np.array(x, np.float32)  # a copy: drops write in place
    n = len(x)
    if n == 0:
        return x
    if c.muffle_prob and rng.random() < c.muffle_prob:
        seg = int(c.muffle_ms * SAMPLE_RATE / 1000)
        ramp = max(1, int(c.muffle_transition_ms * SAMPLE_RATE / 1000))
        start = int(rng.integers(0, max(1, n - seg)))
        t = np.arange(n)
        # Trapezoid: fade into the muffled copy over `ramp` samples, hold `seg`, fade out.
        w = np.clip(np.minimum(t - start + ramp, start + seg + ramp - t) / ramp, 0.0, 1.0)
        x = (1 - w) * x + w * band(x, 0.0, c.muffle_hz)
    if c.snr_db is not None:
        noise = coloured_noise(n, c.noise, rng)
        if c.snr_drift_db:
            t = np.arange(n) / SAMPLE_RATE
            phase = rng.uniform(0, 2 * np.pi)
            drift_db = c.snr_drift_db * np.sin(2 * np.pi * c.noise_variation_speed * t + phase)
            noise = noise * 10 ** (-drift_db / 20)  # SNR moves by +-drift around the mean
        # Scale so the utterance-level SNR is exactly snr_db.
        noise *= np.sqrt(power(x) / (power(noise) * 10 ** (c.snr_db / 10) + 1e-30))
        x = x + noise
    if c.telephony:
        x = band(x, 300.0, 3400.0)
    if c.drop_rate:
        burst = max(1, int(c.drop_ms * SAMPLE_RATE / 1000))
        for _ in range(rng.poisson(c.drop_rate * n / burst)):
            start = int(rng.integers(0, n))
            x[start:start + burst] = 0.0
    return x.astype(np.float32)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes -> (float32 mono in [-1, 1], sample rate)."""
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit PCM WAV, got {8 * w.getsampwidth()}-bit")
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
        return x.reshape(-1, w.getnchannels()).mean(axis=1), w.getframerate()


# ----------------------------------------------------------------------------- engines

class Engine(Protocol):
    name: str
    voices: tuple[str, ...]
    ident: str  # what, besides text and voice, determines the audio (part of the cache key)

    def synthesize(self, text: str, voice: Voice) -> tuple[np.ndarray, int]: ...


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise EngineMissing(f"TTS program {binary!r} not found on PATH; install the Debian package "
                            f"{package!r} (apt-get install -y {package})")
    return path


def _run_to_wav(cmd: list[str], out: pathlib.Path) -> tuple[np.ndarray, int]:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return read_wav(out.read_bytes())


class EspeakNG:
    """espeak-ng formant synthesis, 22.05 kHz. Voices: English accents x voice variants."""
    name = "espeak-ng"
    voices = tuple(f"{lang}+{var}" for lang in ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
                   for var in ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4", "f5"))

    def __init__(self, binary: str = "espeak-ng"):
        self.binary = self.ident = binary

    def synthesize(self, text, voice):
        exe = _require(self.binary, "espeak-ng")
        with tempfile.TemporaryDirectory() as d:
            out = pathlib.Path(d) / "out.wav"
            cmd = [exe, "-v", voice.name, "-s", str(int(round(175 * voice.rate))),
                   "-p", str(int(np.clip(round(50 * voice.pitch), 0, 99))), "-w", str(out), "--", text]
            return _run_to_wav(cmd, out)


class Flite:
    """CMU flite, 16 kHz voices."""
    name = "flite"
    voices = ("slt", "awb", "rms", "kal16")
    BASE_F0 = {"slt": 170.0, "awb": 110.0, "rms": 100.0, "kal16": 105.0}  # approx. mean F0 (Hz)

    def __init__(self, binary: str = "flite"):
        self.binary = self.ident = binary

    def synthesize(self, text, voice):
        exe = _require(self.binary, "flite")
        f0 = self.BASE_F0.get(voice.name, 120.0) * voice.pitch
        with tempfile.TemporaryDirectory() as d:
            out = pathlib.Path(d) / "out.wav"
            cmd = [exe, "-voice", voice.name, "--setf", f"duration_stretch={1.0 / voice.rate:.4f}",
                   "--setf", f"int_f0_target_mean={f0:.1f}", "-t", text, "-o", str(out)]
            return _run_to_wav(cmd, out)


class OpenAISpeech:
    """An OpenAI-compatible `/v1/audio/speech` endpoint (OpenAI itself, or a local server).

    response_format "wav" (rate from the header) or "pcm" (raw 16-bit little-endian at
    `pcm_rate`, 24 kHz for OpenAI).
    """
    name = "openai"
    voices = ("alloy", "ash", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer")

    def __init__(self, model: str = "gpt-4o-mini-tts", base_url: str | None = None, api_key: str | None = None,
                 response_format: str = "wav", pcm_rate: int = 24_000, client=None):
        if response_format not in ("wav", "pcm"):
            raise ValueError(f"response_format {response_format!r}: use 'wav' or 'pcm'")
        if client is None:
            import openai
            client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"))
        self.client, self.model, self.format, self.pcm_rate = client, model, response_format, pcm_rate
        self.ident = f"openai:{client.base_url}:{model}"

    def synthesize(self, text, voice):
        resp = self.client.audio.speech.create(model=self.model, voice=voice.name, input=text,
                                               response_format=self.format, speed=voice.rate)
        data = resp.read() if hasattr(resp, "read") else resp.content
        if self.format == "wav":
            return read_wav(data)
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0, self.pcm_rate


ENGINES = {"espeak-ng": EspeakNG, "flite": Flite, "openai": OpenAISpeech}


def make_engine(name: str, **kwargs) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown TTS engine {name!r}; choose from {sorted(ENGINES)}")
    return ENGINES[name](**kwargs)


def voice_for_user(engine: Engine, user_id: str, seed: int = 0) -> Voice:
    """A stable voice per simulated user: same user + seed, same voice."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return Voice(engine.name, str(rng.choice(engine.voices)),
                 rate=round(float(rng.uniform(0.85, 1.15)), 3), pitch=round(float(rng.uniform(0.8, 1.2)), 3))


class TTS:
    """engine + on-disk cache + conditions -> 16 kHz mono float32."""

    def __init__(self, engine: Engine | str = "espeak-ng", cache_dir: str | os.PathLike | None = None, **engine_kwargs):
        self.engine = make_engine(engine, **engine_kwargs) if isinstance(engine, str) else engine
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
        self.hits = self.misses = 0

    def key(self, text: str, voice: Voice, conditions: Conditions | None) -> str:
        blob = json.dumps([self.engine.ident, text, dataclasses.asdict(voice),
                           conditions and dataclasses.asdict(conditions)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __call__(self, text: str, voice: Voice | None = None, conditions: Conditions | None = None) -> np.ndarray:
        voice = voice or Voice(self.engine.name, self.engine.voices[0])
        if voice.engine != self.engine.name:
            raise ValueError(f"voice for engine {voice.engine!r} given to engine {self.engine.name!r}")
        path = self.cache_dir / f"{self.key(text, voice, conditions)}.npy" if self.cache_dir else None
        if path is not None and path.exists():
            self.hits += 1
            return np.load(path)
        self.misses += 1
        x, sr = self.engine.synthesize(text, voice)
        x = resample(x, sr, SAMPLE_RATE)
        if conditions is not None:
            # Per-utterance randomness, reproducible from the conditions' seed and the text.
            digest = hashlib.sha256(f"{conditions.seed}:{text}".encode()).digest()
            x = apply_conditions(x, conditions, np.random.default_rng(int.from_bytes(digest[:8], "little")))
        x = np.ascontiguousarray(x, np.float32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                np.save(f, x)
            os.replace(f.name, path)  # atomic: concurrent rollouts never read a half-written file
        return x
