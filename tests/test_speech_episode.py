"""Speech episodes end to end: espeak-ng user turns heard by a tiny thinker through the batched
multi-turn sampler, packed with their audio, scored by the train step.

References: the Omni thinker's own forward (`omni.Thinker`, the audio encoder on mel chunks and
the flat-stream `merge_audio`, itself checked against transformers in test_omni.py) for the
sampler's log-probs, and the audio duration for the placeholder count."""
import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarl_jax import rollout, sharding
from tarl_jax.models import omni, presets
from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
from tarl_jax.rl import pack
from tarl_jax.rl import step as step_lib
from tarl_jax.sampler import Sampler
from tarl_jax.sandbox import speech, synth
from tarl_jax.sandbox.env import Env
from tarl_jax.sandbox.episode import run_episode
from tarl_jax.sandbox.user import OfflineUser
from tarl_jax.speech_view import SpeechView

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = ChatTokenizer(tiny_tokenizer_dir())
    text = presets.get("micro")
    cfg = omni.ThinkerConfig(audio=presets.audio("micro", text.hidden_size), text=text,
                             audio_token_id=tok.audio_id, freeze_audio=True)
    params = omni.init_params(cfg, jax.random.key(0))
    tts = speech.TTS("espeak-ng", cache_dir=tmp_path_factory.mktemp("tts"))
    view = SpeechView(tts, cfg, params["audio_tower"])
    world, tasks = synth.make_world(synth.SynthConfig(num_tasks=8))

    def run_one(task, agent):
        return run_episode(Env(world, task), task, agent, OfflineUser(task, world), max_steps=3)

    sampler = Sampler(text, params["model"], cache_len=4096, audio_token_id=tok.audio_id,
                      prefill_chunk=256)
    decode = rollout.DecodeConfig(max_turn_tokens=10, temperature=1.0)
    episodes, _ = rollout.run_batch(tasks[:3], run_one, sampler, tok, decode, jax.random.key(3),
                                    rollout.minimal_tools, speech=view)
    return tok, cfg, params, view, episodes


def test_user_turns_are_heard_as_audio(setup):
    tok, cfg, _, view, episodes = setup
    for ep in episodes:
        assert ep.mode == "speech" and ep.agent_turns
        users = [t for t in ep.turns if getattr(t, "kind", None) == "user"]
        heard = ep.heard_audio
        assert heard and [t.audio[0] for t in users[:len(heard)]] == heard
        # The transcript stays text: the judge and the user simulator read it.
        assert all(isinstance(m["content"], str) for m in ep.messages if m["role"] == "user")
        for turn in ep.agent_turns:
            ids = np.asarray(turn.prompt_ids)
            waves = [view._wave(r) for r in turn.audio or []]
            # 25 placeholders per second of 16 kHz audio, exactly what the encoder emits.
            emitted = [len(e) for e in view.embeddings(turn.audio or [])]
            assert int((ids == tok.audio_id).sum()) == sum(emitted)
            for w, n in zip(waves, emitted):
                assert abs(n - 25 * len(w) / speech.SAMPLE_RATE) <= 1
            assert int((ids == tok.audio_bos_id).sum()) == len(waves)


def test_sampler_logprobs_equal_the_thinker_forward(setup):
    """Each episode's whole stream through the thinker (encoder on mel chunks): the log-probs of
    the sampled tokens equal the ones the sampler recorded while prefilling audio turn by turn."""
    tok, cfg, params, view, episodes = setup
    for ep in episodes:
        stream = pack.episode_stream(ep)
        refs = ep.heard_audio
        mel, lens, _ = omni.audio_inputs([view._wave(r) for r in refs], cfg)
        tokens = jnp.asarray(stream.tokens)[None]
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        hidden, _ = omni.apply(cfg, params, tokens, positions, mel=mel, mel_lens=lens)
        logits = omni.apply(cfg, params, hidden, method=omni.Thinker.logits)[0]
        logp = jax.nn.log_softmax(logits[:-1], axis=-1)
        lp = np.asarray(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0])
        gen = stream.turn[1:] >= 0
        assert gen.sum() > 0
        diff = np.abs(lp[gen] - stream.logprobs[1:][gen]).max()
        assert diff < 1e-5, diff


def test_packed_speech_batch_masks_audio_and_matches_rollout(setup):
    tok, cfg, params, view, episodes = setup
    packed = pack.pack(episodes, np.ones(len(episodes), np.float32), seq_lens=(4096,), rows=(2, 4),
                       audio=view, audio_token_id=tok.audio_id)
    a = packed.arrays
    assert a["audio"].shape[0] == a["tokens"].shape[0] and a["audio"].shape[2] == cfg.audio.output_dim
    is_audio_target = a["targets"] == tok.audio_id
    assert is_audio_target.any() and not (a["loss_mask"] & is_audio_target).any()
    step_cfg = step_lib.StepConfig(logprob_chunk=512, audio_token_id=tok.audio_id)
    logp, _, _ = step_lib.forward(cfg.text, {"policy": params["model"]}, a, step_cfg)
    mask = a["loss_mask"]
    diff = np.abs(np.asarray(logp)[mask] - a["logprobs"][mask]).max()
    assert diff < 1e-5, diff
    # Without the audio the same tokens score differently: the embeddings are really used.
    plain = {k: v for k, v in a.items() if k != "audio"}
    logp_text, _, _ = step_lib.forward(cfg.text, {"policy": params["model"]}, plain, step_cfg)
    assert np.abs(np.asarray(logp_text)[mask] - a["logprobs"][mask]).max() > 1e-3


def test_trained_encoder_step_encodes_the_rows_log_mel(setup):
    """model.train_audio: the batch carries each row's log-mel chunks and the step runs the
    encoder. Same log-probs as the cached embeddings (so the rollout's), and a gradient that
    reaches the encoder and moves it."""
    tok, cfg, params, view, episodes = setup
    kw = dict(seq_lens=(4096,), rows=(2, 4), audio=view, audio_token_id=tok.audio_id)
    advs = np.array([1.0, -1.0, 0.5], np.float32)
    emb = pack.pack(episodes, advs, **kw).arrays
    mel = pack.pack(episodes, advs, audio_as="mel", **kw).arrays
    assert "audio" not in mel and mel["mel"].shape[:2] == mel["mel_lens"].shape
    np.testing.assert_array_equal(emb["tokens"], mel["tokens"])
    step_cfg = step_lib.StepConfig(logprob_chunk=512, audio_token_id=tok.audio_id, audio=cfg.audio)
    both = {"policy": params["model"], "audio": params["audio_tower"]}
    logp_emb, _, _ = step_lib.forward(cfg.text, both, emb, step_cfg)
    logp_mel, _, _ = step_lib.forward(cfg.text, both, mel, step_cfg)
    mask = mel["loss_mask"]
    np.testing.assert_allclose(np.asarray(logp_mel)[mask], np.asarray(logp_emb)[mask], atol=1e-5)
    assert np.abs(np.asarray(logp_mel)[mask] - mel["logprobs"][mask]).max() < 1e-5
    # One jitted update with the encoder in the state: it gets a gradient and moves.
    opt = step_lib.make_optimizer(1e-2)
    mesh = sharding.make_mesh()
    sh = step_lib.state_shardings(cfg.text, opt, False, mesh, audio_cfg=cfg.audio)
    state = step_lib.init_state(params["model"], opt, cfg.text, False, sh, params["audio_tower"])
    before = jax.tree.map(np.array, state["params"]["audio"])
    keys = step_lib.BATCH_KEYS + step_lib.GATHER_KEYS + step_lib.MEL_KEYS
    fn = step_lib.jit_train_step(cfg.text, step_cfg, opt, mesh, sh, keys)
    state, m = fn(state, step_lib.device_batch(mel, keys, mesh), jax.random.key(0))
    moved = [np.abs(np.asarray(a) - b).max() for a, b in
             zip(jax.tree.leaves(state["params"]["audio"]), jax.tree.leaves(before))]
    assert float(m["grad_norm"]) > 0 and min(moved) > 0, moved


def test_a_new_encoder_version_drops_cached_embeddings(setup):
    tok, cfg, params, view, episodes = setup
    refs = episodes[0].heard_audio[:1]
    old = view.stream(refs)
    try:
        view.set_encoder(jax.tree.map(lambda x: x * 1.5, params["audio_tower"]))
        new = view.stream(refs)
        assert new.shape == old.shape and np.abs(new - old).max() > 1e-3
    finally:
        view.set_encoder(params["audio_tower"])
    np.testing.assert_allclose(view.stream(refs), old, atol=1e-6)


def test_truncated_speech_episode_keeps_only_its_heard_audio(setup):
    tok, cfg, _, view, episodes = setup
    ep = episodes[0]
    first = len(ep.agent_turns[0].prompt_ids)
    n_first = int((np.asarray(ep.agent_turns[0].prompt_ids) == tok.audio_id).sum())
    packed = pack.pack([ep], None, seq_lens=(first,), rows=(1,), overflow="truncate",
                       audio=view, audio_token_id=tok.audio_id)
    emb = view.stream(ep.agent_turns[0].audio)
    np.testing.assert_array_equal(packed.arrays["audio"][0, :n_first], emb)
    assert not packed.arrays["audio"][0, n_first:].any()


def test_speech_episodes_need_the_view_to_pack(setup):
    _, _, _, _, episodes = setup
    with pytest.raises(ValueError, match="audio="):
        pack.pack(episodes, None, seq_lens=(4096,), rows=(4,))


def test_sampler_audio_across_prefill_chunks_equals_one_shot():
    """Placeholders straddling prefill chunks take the right embeddings in every chunk."""
    tok = ChatTokenizer(tiny_tokenizer_dir())
    cfg = dataclasses.replace(presets.get("micro"))
    params = jax.tree.map(np.asarray, omni.init_params(
        omni.ThinkerConfig(audio=presets.audio("micro", cfg.hidden_size), text=cfg,
                           audio_token_id=tok.audio_id), jax.random.key(1))["model"])
    rng = np.random.default_rng(0)
    rows = []
    audio = []
    for n_audio in (37, 0, 70):
        ids = list(rng.integers(10, 400, 20)) + [tok.audio_id] * n_audio + list(rng.integers(10, 400, 9))
        rows.append(ids)
        audio.append(rng.normal(size=(n_audio, cfg.hidden_size)).astype(np.float32) if n_audio else None)
    big = Sampler(cfg, params, cache_len=256, audio_token_id=tok.audio_id, prefill_chunk=1024)
    small = Sampler(cfg, params, cache_len=256, audio_token_id=tok.audio_id, prefill_chunk=16,
                    min_bucket=16)
    h_big = np.asarray(big.start(rows, audio).hidden)
    h_small = np.asarray(small.start(rows, audio).hidden)
    np.testing.assert_allclose(h_small, h_big, atol=1e-5)
    with pytest.raises(ValueError, match="placeholders"):
        big.start(rows, [None, None, audio[2]])


def test_policy_never_samples_a_placeholder_and_text_never_becomes_one():
    """A sampled or echoed <|AUDIO|> would take a heard utterance's place in training (a crash
    seen in the first full tiny_speech run: a tool echoed a sampled argument)."""
    tok = ChatTokenizer(tiny_tokenizer_dir())
    cfg = presets.get("micro")
    params = jax.tree.map(np.asarray, omni.init_params(
        omni.ThinkerConfig(audio=presets.audio("micro", cfg.hidden_size), text=cfg,
                           audio_token_id=tok.audio_id), jax.random.key(2))["model"])
    for start in range(5, 500, 4):       # a prompt that does not hold the favourite token
        prompt = [list(range(start, start + 4))]
        top = Sampler(cfg, params, cache_len=64).generate(
            prompt, max_new_tokens=1, temperature=0.0)[0].tokens[0]
        if top not in prompt[0]:
            break
    # Pretend the model's favourite token is the placeholder: greedy must pick another one, and
    # its log-prob stays the model's own (the ban, like truncation, is not in the log-probs).
    banned = Sampler(cfg, params, cache_len=64, audio_token_id=top).generate(
        prompt, max_new_tokens=1, temperature=0.0)[0]
    assert banned.tokens[0] != top
    full = Sampler(cfg, params, cache_len=64).start(prompt)
    logits = qwen_logits(cfg, params, full.hidden)
    want = float(jax.nn.log_softmax(logits)[0, banned.tokens[0]])
    assert abs(banned.logprobs[0] - want) < 1e-5
    # Env text spelling a marker is escaped before it is tokenised.
    msg = {"role": "tool", "content": 'Error: malformed tool call: {"x": "<|AUDIO|><|audio_bos|>"}'}
    esc = rollout._escape_audio(msg)
    ids = tok.render_append([esc])
    assert tok.audio_id not in ids and tok.audio_bos_id not in ids
    assert "AUDIO" in esc["content"] and msg["content"].startswith("Error")


def qwen_logits(cfg, params, hidden):
    from tarl_jax.models import qwen
    return qwen.Decoder(cfg).apply({"params": params}, hidden, method=qwen.Decoder.logits)
