"""Thinker parity with transformers' PyTorch Qwen2.5-Omni thinker on a tiny random checkpoint."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tarl_jax.models import audio, omni

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

AUDIO_ID = 1000  # a small vocab keeps the test fast; the id is read from the config
SAMPLES = (48_000, 43_237)  # 3 s -> 300 frames -> 75 tokens; odd -> 271 frames -> 68 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          output_dim=64, num_mel_bins=128, n_window=100),
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        audio_token_index=AUDIO_ID)
    cfg.vision_start_token_id = 151652  # missing from the thinker config in transformers 5.24
    torch.manual_seed(0)
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    alone = tmp_path_factory.mktemp("thinker")
    model.save_pretrained(alone)
    return model, alone


def full_omni_layout(alone, out):
    """Rewrite a thinker-only save as a real Qwen2.5-Omni checkpoint: `thinker.*` names, talker and
    token2wav tensors beside it, two shards with an index, thinker_config inside config.json."""
    tensors = {"thinker." + k: v for k, v in load_file(alone / "model.safetensors").items()}
    tensors["talker.codec_head.weight"] = np.zeros((8, 4), np.float32)
    tensors["token2wav.code_embed.weight"] = np.zeros((8, 4), np.float32)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out.mkdir()
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / fname))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    thinker = json.loads((alone / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": thinker}))
    return out


def prompt(counts):
    ids = [5, 6, 7]
    for i, n in enumerate(counts):
        ids += [11] + [AUDIO_ID] * int(n) + [12] + [20 + i, 21]
    return np.array([ids], np.int32)


def waves():
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in SAMPLES]


def test_thinker_logits_match_transformers(tiny, tmp_path):
    model, alone = tiny
    cfg, params = omni.load_thinker(full_omni_layout(alone, tmp_path / "omni"))
    assert cfg.audio_token_id == AUDIO_ID and not cfg.text.tie_embeddings

    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    feats = fe(waves(), sampling_rate=16000, return_attention_mask=True, return_tensors="np")
    frames = feats["attention_mask"].sum(-1)
    counts = audio.output_tokens(frames)
    assert list(counts) == list(omni.audio_token_count(np.array(SAMPLES))) == [75, 68]
    ids = prompt(counts)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    input_features=torch.tensor(feats["input_features"]),
                    feature_attention_mask=torch.tensor(feats["attention_mask"]),
                    attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()

    @jax.jit
    def logits(params, ids, mel=None, mel_lens=None, audio_embeds=None):
        positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        hidden, _ = omni.apply(cfg, params, ids, positions, mel=mel, mel_lens=mel_lens, audio_embeds=audio_embeds)
        return omni.apply(cfg, params, hidden, method=omni.Thinker.logits)

    # Same mel input, laid out as encoder chunks.
    src, lens = audio.chunk_plan(frames, feats["input_features"].shape[-1], cfg.audio.window)
    mel = audio.take_chunks(jnp.asarray(feats["input_features"]), src, cfg.audio.window)
    omni.check_placeholders(ids, counts.sum(), AUDIO_ID)
    diff = np.abs(np.asarray(logits(params, ids, mel=mel, mel_lens=lens)) - ref).max()
    print(f"thinker logits max|diff| (same log-mel) = {diff:.2e}")
    assert diff < 1e-4

    # End to end from the waveforms with our log-mel, through the frozen-encoder cache; a
    # repeated utterance is a cache hit and returns the same embeddings.
    cache = omni.AudioEmbeddingCache(cfg, params["audio_tower"])
    w = waves()
    stream = cache.stream(w)
    diff = np.abs(np.asarray(logits(params, ids, audio_embeds=stream)) - ref).max()
    print(f"thinker logits max|diff| (waveform -> our log-mel -> cached embeddings) = {diff:.2e}")
    assert diff < 1e-4
    again = cache.stream([w[1], w[0]])
    assert (cache.hits, cache.misses) == (2, 2)
    np.testing.assert_array_equal(again[:68], stream[75:143])


def test_thinker_alone_loads_freezes_and_names_bad_tensors(tiny, tmp_path):
    _, alone = tiny
    cfg, params = omni.load_thinker(alone)  # thinker-only layout, visual.* skipped
    assert params["audio_tower"]["conv1"]["kernel"].shape == (3, 128, 64)

    # freeze_audio: no gradient reaches the encoder, and the optimizer mask leaves it out.
    mel, lens, _ = omni.audio_inputs(waves()[:1], cfg)
    def loss(p, c):
        return omni.apply(c, p, mel, lens, method=omni.Thinker.encode_audio).sum()
    frozen = dataclasses.replace(cfg, freeze_audio=True)
    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, frozen)
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["audio_tower"]))
    mask = omni.trainable_mask(params, frozen)
    assert not any(jax.tree.leaves(mask["audio_tower"])) and all(jax.tree.leaves(mask["model"]))

    tensors = load_file(alone / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((alone / "config.json").read_text())
    short = dict(tensors)
    del short["audio_tower.layers.1.fc2.bias"]
    save_file(short, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="audio_tower.layers.1.fc2.bias"):
        omni.load_thinker(bad)
    wrong = dict(tensors, **{"audio_tower.proj.weight": np.zeros((64, 32), np.float32)})
    save_file(wrong, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"audio_tower.proj.weight.*\(64, 32\)"):
        omni.load_thinker(bad)
    short = dict(tensors)
    del short["model.layers.0.self_attn.q_proj.bias"]
    save_file(short, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.bias"):
        omni.load_thinker(bad)


def test_placeholder_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match=re.escape("2 <|AUDIO|> placeholders (id 1000) but 3")):
        omni.check_placeholders(np.array([[1, AUDIO_ID, AUDIO_ID]]), 3, AUDIO_ID)


def test_trainer_loads_an_omni_checkpoint_as_policy_and_frozen_ears(tiny, tmp_path):
    """model.audio=hf: the thinker's decoder is the policy, its encoder feeds the SpeechView;
    the checkpoint's audio_token_index must be the tokenizer's <|AUDIO|>."""
    import ml_collections

    from tarl_jax import components
    from tarl_jax.models.tokenizer import ChatTokenizer, tiny_tokenizer_dir
    _, alone = tiny
    ckpt = full_omni_layout(alone, tmp_path / "omni")
    tok_id = ChatTokenizer(tiny_tokenizer_dir()).audio_id
    mcfg = ml_collections.ConfigDict(dict(
        preset="", hf_dir=str(ckpt), gguf="", tokenizer=str(tiny_tokenizer_dir()),
        dtype="float32", scan_layers=False, remat="none", audio="hf"))
    with pytest.raises(ValueError, match="audio_token_id"):
        components.load_model(mcfg, None, None, 0, with_audio=True)   # the fixture's id is 1000
    cfg_json = json.loads((ckpt / "config.json").read_text())
    cfg_json["thinker_config"]["audio_token_index"] = tok_id
    (ckpt / "config.json").write_text(json.dumps(cfg_json))
    tok, cfg, params, (tcfg, audio_params) = components.load_model(mcfg, None, None, 0, with_audio=True)
    ref_cfg, ref = omni.load_thinker(ckpt)
    assert cfg == ref_cfg.text and tcfg.freeze_audio and tcfg.audio_token_id == tok.audio_id
    for got, want in ((params, ref["model"]), (audio_params, ref["audio_tower"])):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
