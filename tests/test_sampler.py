"""Sampler: exact against transformers' greedy generate and against full forward passes.

One tiny random Qwen3 (float32, CPU), built in transformers and loaded with `models.hf`. All
tests share batch 3, cache 64 and 8-token prefill chunks, so prompts longer than 8 also exercise
chunked prefill and every test reuses the same few compiles.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tarl_jax import sampler as sampler_lib
from tarl_jax.models import hf, qwen

CACHE = 64
PROMPTS = [[5, 17, 3], [9, 1, 44, 7, 7, 30, 2, 90, 11], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 4]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
        tie_word_embeddings=False, max_position_embeddings=CACHE)
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norm scales start at 1: perturb them so a misplaced scale shows
        for name, w in model.named_parameters():
            if "norm" in name:
                w.add_(0.2 * torch.randn_like(w))
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    cfg, params = hf.load_hf(path)
    return model, cfg, params, sampler_lib.Sampler(cfg, params, cache_len=CACHE, prefill_chunk=8, min_bucket=16)


def full_logits(cfg, params, seqs):
    """Uncached causal forward over right-padded sequences -> [B, T, V] logits."""
    model = qwen.Decoder(cfg)
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for b, seq in enumerate(seqs):
        tokens[b, :len(seq)] = seq
    hidden, _ = model.apply({"params": params}, tokens, np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape))
    return model.apply({"params": params}, hidden, method=qwen.Decoder.logits)


def greedy(s, prompts=PROMPTS, **kw):
    return s.generate(prompts, temperature=0.0, **{"max_new_tokens": 12, **kw})


def test_greedy_matches_transformers_generate(tiny):
    model, _, _, s = tiny
    outs = greedy(s)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        assert out.tokens == ref_tokens and out.finish_reason == "length"
        ref_lp = torch.stack(ref.logits)[:, 0].log_softmax(-1)[torch.arange(12), ref_tokens]
        np.testing.assert_allclose(out.logprobs, ref_lp.numpy(), atol=1e-4)


@pytest.mark.parametrize("mode", ["tempered", "raw"])
def test_logprobs_equal_full_forward(tiny, mode):
    _, cfg, params, s = tiny
    if mode == "raw":
        s = sampler_lib.Sampler(cfg, params, cache_len=CACHE, prefill_chunk=8, min_bucket=16, logprobs="raw")
    temps = np.array([0.7, 1.3, 0.0], np.float32)
    outs = s.generate(PROMPTS, max_new_tokens=12, temperature=temps, top_p=0.9, seed=1)
    logits = full_logits(cfg, params, [p + o.tokens for p, o in zip(PROMPTS, outs)])
    for row, (prompt, out, temp) in enumerate(zip(PROMPTS, outs, temps)):
        row_logits = logits[row, len(prompt) - 1:len(prompt) + 11]
        if mode == "tempered" and temp > 0:
            row_logits = row_logits / temp
        ref = jax.nn.log_softmax(row_logits)[jnp.arange(12), jnp.asarray(out.tokens)]
        np.testing.assert_allclose(out.logprobs, ref, atol=1e-5)


def test_append_continuation_equals_reencoding(tiny):
    _, _, _, s = tiny
    state = s.start(PROMPTS)
    state, first = s.decode(state, max_new_tokens=[5, 7, 3], temperature=0.0)
    turn = [[100, 101, 102, 103], [], [110, 111, 112, 113, 114, 115]]  # row 1: nothing new
    state = s.append(state, turn)
    history = [p + o.tokens + t for p, o, t in zip(PROMPTS, first, turn)]
    np.testing.assert_array_equal(state.length, [len(h) for h in history])
    fresh = s.start(history)
    np.testing.assert_allclose(state.hidden, fresh.hidden, atol=1e-5)
    _, cont = s.decode(state, max_new_tokens=8, temperature=0.0)
    _, ref = s.decode(fresh, max_new_tokens=8, temperature=0.0)
    for a, b in zip(cont, ref):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_prefill_plan_feeds_every_token_once_in_few_padded_slots():
    rng = np.random.default_rng(0)
    for trial in range(200):
        num = rng.integers(0, 300, rng.integers(1, 40)) * (rng.random() < 0.9)
        block, widest = int(rng.choice([8, 16, 32])), int(rng.choice([64, 256, 1024]))
        fed = np.zeros_like(num)
        for offset, width, rows in sampler_lib.prefill_plan(num, block, widest):
            assert offset == fed.max() and block <= width <= widest and width & (width - 1) == 0
            np.testing.assert_array_equal(rows, np.nonzero(num > offset)[0])
            fed[rows] = np.minimum(num[rows], offset + width)
            if rows.size > 1:   # a call wider than the block is filled by every row in it
                assert width == block or (num[rows] >= offset + width).all()
        np.testing.assert_array_equal(fed, num)
    # A rollout round: one 170-token tool result beside 26 short user turns.
    plan = sampler_lib.prefill_plan([170] + [20] * 26, 32, 1024)
    assert [(o, w, r.size) for o, w, r in plan] == [(0, 32, 27), (32, 256, 1)]


def test_ragged_append_equals_each_row_alone(tiny):
    """Rows of very different new lengths appended together (gathered subsets of rows, padded
    row counts) hold what each row appended on its own holds, and decode the same."""
    _, cfg, params, _ = tiny
    together = sampler_lib.Sampler(cfg, params, cache_len=128, prefill_chunk=32, prefill_block=8)
    alone = sampler_lib.Sampler(cfg, params, cache_len=128, prefill_chunk=128)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 120, n).tolist() for n in (12, 3, 20, 9, 1)]
    turns = [rng.integers(1, 120, n).tolist() for n in (0, 40, 5, 17, 60)]
    live = together.append(together.start(prompts), turns)
    state = jax.device_get(live)     # decode consumes `live`
    _, outs = together.decode(live, max_new_tokens=6, temperature=0.0)
    for b, (prompt, turn) in enumerate(zip(prompts, turns)):
        one = alone.start([prompt + turn])
        assert int(one.length[0]) == int(state.length[b]) == len(prompt) + len(turn)
        n = len(prompt) + len(turn)
        for layer in range(cfg.num_layers):
            np.testing.assert_allclose(state.cache["k"][layer][0, b, ..., :n],
                                       one.cache["k"][layer][0, 0, ..., :n], atol=1e-5)
            np.testing.assert_allclose(state.cache["v"][layer][0, b, :, :n],
                                       one.cache["v"][layer][0, 0, :, :n], atol=1e-5)
        np.testing.assert_allclose(state.hidden[b], one.hidden[0], atol=1e-5)
        _, ref = alone.decode(one, max_new_tokens=6, temperature=0.0)
        assert outs[b].tokens == ref[0].tokens



def test_chunked_decode_samples_what_one_call_does(tiny):
    """decode_chunk: a reply decoded in calls of 5 steps, the rows still running gathered into a
    smaller state between them, samples the same tokens (same keys, same step counters), with
    the same log-probs, top log-probs, finish reasons and cache as one call over every row."""
    _, cfg, params, _ = tiny
    one = sampler_lib.Sampler(cfg, params, cache_len=128, prefill_chunk=32)
    cut = sampler_lib.Sampler(cfg, params, cache_len=128, prefill_chunk=32, decode_chunk=5)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, 120, n).tolist() for n in (4, 9, 2, 30, 7, 12)]
    STOPS = list(range(0, 128, 9))
    # Replies that end at different steps: stop tokens hit at random, caps of 0 to 23 steps,
    # a row that fills its cache (row 3, no stop token: 30 + 98 = 128), greedy beside sampled.
    sampling = dict(max_new_tokens=[23, 0, 17, 110, 3, 23], temperature=[1.0, 1.0, 0.0, 1.0, 0.7, 1.3],
                    top_k=[0, 0, 0, 0, 20, 0], stop_tokens=[STOPS] * 3 + [[]] + [STOPS] * 2,
                    seed=jax.random.key(3),
                    first_step=[0, 0, 4, 0, 0, 2], top_logprobs=2)
    outs = {}
    for name, s in (("one", one), ("cut", cut)):
        state, outs[name] = s.decode(s.start(prompts), **sampling)
        outs[name + "_state"] = jax.device_get(state)
    assert len({len(c.tokens) for c in outs["one"]}) >= 4     # the rows do end apart
    assert {c.finish_reason for c in outs["one"]} == {"stop", "length", "cache_full"}
    for a, b in zip(outs["one"], outs["cut"]):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert [[t for t, _ in step] for step in a.top] == [[t for t, _ in step] for step in b.top]
    x, y = outs["one_state"], outs["cut_state"]
    np.testing.assert_array_equal(x.length, y.length)
    np.testing.assert_allclose(x.hidden, y.hidden, atol=1e-5)
    for b, n in enumerate(np.asarray(x.length)):
        for layer in range(cfg.num_layers):
            np.testing.assert_allclose(x.cache["v"][layer][0, b, :, :n],
                                       y.cache["v"][layer][0, b, :, :n], atol=1e-5)

def test_kv_window_equals_attending_to_the_whole_cache(tiny):
    """Multi-turn sampling with windows growing past several powers of two equals the sampler
    that always attends to every cache slot (the windowed programs are really used)."""
    _, cfg, params, _ = tiny
    kw = dict(cache_len=256, prefill_chunk=8, min_bucket=16)
    windowed = sampler_lib.Sampler(cfg, params, min_kv_window=16, **kw)
    whole = sampler_lib.Sampler(cfg, params, min_kv_window=256, **kw)
    assert windowed._model(20).kv_window == 32 and whole._model(20).kv_window == 0
    states = [s.start(PROMPTS) for s in (windowed, whole)]
    rng = np.random.default_rng(0)
    for turn in range(4):
        outs = []
        for i, s in enumerate((windowed, whole)):
            states[i], o = s.decode(states[i], max_new_tokens=9, temperature=0.8, seed=turn)
            outs.append(o)
        for a, b in zip(*outs):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        new = [rng.integers(1, 120, n).tolist() for n in (3, 0, 30)]
        states = [s.append(st, new) for s, st in zip((windowed, whole), states)]
        np.testing.assert_allclose(states[0].hidden, states[1].hidden, atol=1e-5)
    assert int(np.max(states[0].length)) > 128   # windows of 32 .. 256 were all exercised


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    _, _, _, s = tiny
    want = [o.tokens for o in greedy(s)]
    assert [o.tokens for o in s.generate(PROMPTS, max_new_tokens=12, top_k=1, seed=3)] == want
    assert [o.tokens for o in s.generate(PROMPTS, max_new_tokens=12, top_p=1e-6, seed=3)] == want

    # One sampled row makes the whole batch draw noise; its greedy rows stay greedy.
    mixed = s.generate(PROMPTS, max_new_tokens=12, temperature=[0.0, 1.0, 0.0], seed=3)
    assert [mixed[0].tokens, mixed[2].tokens] == [want[0], want[2]]
    logits = jax.random.normal(jax.random.key(0), (5, 128))
    keys = jax.random.split(jax.random.key(1), 5)
    zero, one = jnp.zeros(5), jnp.ones(5)
    np.testing.assert_array_equal(
        sampler_lib.sample_logits(logits, keys, zero, one, jnp.zeros(5, int), False, draw=False),
        sampler_lib.sample_logits(logits, keys, zero, one, jnp.zeros(5, int), False, draw=True))


def test_stop_tokens_max_lengths_and_cache_full(tiny):
    _, _, _, s = tiny
    prompts = PROMPTS[:2] + [list(range(1, 59))]  # 58 tokens: 6 slots left in the cache
    ref = [o.tokens for o in greedy(s, prompts)]
    assert len(ref[2]) == 6
    cut = next(i for i in range(2, 12) if ref[0][i] not in ref[0][:i])
    stops = [[ref[0][cut]], [], [ref[2][0]]]
    state = s.start(prompts)
    state, outs = s.decode(state, temperature=0.0, max_new_tokens=[12, 4, 12], stop_tokens=stops)
    assert [(o.tokens, o.finish_reason) for o in outs] == [
        (ref[0][:cut + 1], "stop"), (ref[1][:4], "length"), (ref[2][:1], "stop")]
    # The stop token itself is in the cache: lengths count every sampled token.
    np.testing.assert_array_equal(state.length, [len(p) + len(o.tokens) for p, o in zip(prompts, outs)])
    _, outs = s.decode(state, temperature=0.0, max_new_tokens=12)
    assert outs[2].tokens == ref[2][1:] and outs[2].finish_reason == "cache_full"


def test_too_long_inputs_raise(tiny):
    _, _, _, s = tiny
    with pytest.raises(ValueError, match=r"\(row, length\) \[\(1, 65\)\] exceed cache_len=64"):
        s.start([[1], [2] * 65, [3]])
    with pytest.raises(ValueError, match="empty"):
        s.start([[1], [], [3]])
    state = s.start(PROMPTS)
    with pytest.raises(ValueError, match=r"rows \[2\] would hold \[65\] tokens > cache_len=64"):
        s.append(state, [[], [], [7] * (CACHE + 1 - len(PROMPTS[2]))])


def test_seeded_sampling_is_reproducible(tiny):
    _, _, _, s = tiny
    run = lambda seed: [o.tokens for o in s.generate(PROMPTS, max_new_tokens=12, seed=seed)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_argmax_is_numpys_first_index_of_the_maximum():
    """sampler.argmax (a max and a min, which XLA:CPU vectorises) names the index np.argmax does:
    on ties the first, rows all -inf, a maximum in the first or last column."""
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 4, (64, 300)).astype(np.float32)      # every row ties at its max
    ties[0], ties[1] = -np.inf, 0.0
    ties[1, -1] = ties[2, 0] = 9.0
    banned = rng.standard_normal((8, 2048)).astype(np.float32)
    banned[:, ::3] = -np.inf
    for x in (rng.standard_normal((64, 2048)).astype(np.float32), ties, banned):
        got = np.asarray(jax.jit(sampler_lib.argmax)(x))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_sample_logits_matches_softmax_distribution():
    """Empirical frequencies vs softmax(logits / T), renormalised over the top-k / top-p set."""
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    draw = jax.jit(sampler_lib.sample_logits, static_argnames="truncate")

    def chi2(temperature, top_p, top_k, keep, expected_temperature=None):
        probs = np.asarray(jax.nn.softmax(logits / (expected_temperature or temperature))) * keep
        tokens = draw(jnp.broadcast_to(logits, (n, 6)), jax.random.split(jax.random.key(0), n),
                      jnp.full(n, temperature), jnp.full(n, top_p), jnp.full(n, top_k, jnp.int32), True)
        counts = np.bincount(np.asarray(tokens), minlength=6)
        assert counts[keep == 0].sum() == 0, counts
        expected = n * probs[keep > 0] / probs.sum()
        return ((counts[keep > 0] - expected) ** 2 / expected).sum()

    everything, top3 = np.ones(6), np.array([1, 1, 1, 0, 0, 0])
    # df <= 5: p(chi2 > 30) < 2e-5.
    assert chi2(0.7, 1.0, 0, everything) < 30
    assert chi2(1.5, 1.0, 3, top3) < 30
    # T=1 probabilities .51 .19 .11 .07 ...: mass before the 3rd token is .70 < .8, the 4th .81.
    assert chi2(1.0, 0.8, 0, top3) < 30
    # The bound is falsifiable: sampling at T=1 is rejected as a draw from T=0.7.
    assert chi2(1.0, 1.0, 0, everything, expected_temperature=0.7) > 30


SHARDED = """
import jax, numpy as np
from tarl_jax import sampler as S, sharding
from tarl_jax.models import presets, qwen
assert len(jax.devices()) == 8
cfg = presets.get("tiny")
params = qwen.init_params(cfg, jax.random.key(0))
prompts = [[5, 17, 3, 9], list(range(40, 70)), [7] * 12]
runs = []
for n in (1, 2):
    s = S.Sampler(cfg, None, cache_len=128, prefill_chunk=16,
                  mesh=sharding.make_mesh({"tensor": n}, jax.devices()[:n]))
    s.place(params)
    state = s.start(prompts)
    state, first = s.decode(state, max_new_tokens=12, temperature=1.0, seed=3)
    state = s.append(state, [[11, 12], [], [13] * 20])          # a turn appended to live rows
    state, second = s.decode(state, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=4)
    cache_k = jax.tree.leaves(state.cache["k"])[0]
    spec = cache_k.sharding.spec
    wq = s.params["layers_0"]["attn"]["q"]
    print("n", n, "cache spec", spec, "q devices", len(wq.sharding.device_set))
    assert len(wq.sharding.device_set) == n and len(cache_k.sharding.device_set) == n
    if n == 2:
        assert spec[2] == "tensor", spec                        # KV heads cut over the chips
    runs.append([(c.tokens, c.logprobs) for c in first + second])
for (t1, l1), (t2, l2) in zip(*runs):
    assert t1 == t2, (t1, t2)
    np.testing.assert_allclose(l1, l2, atol=2e-5)
print("SAME")
"""


def test_sampler_cut_over_two_devices_samples_what_one_does():
    """rollout.tensor: the policy and its KV cache cut by heads over 2 of 8 simulated devices
    sample the same tokens (log-probs within float32 rounding) as one device, across a multi-
    turn append."""
    from tests.devices import run_with_devices
    out = run_with_devices(SHARDED)
    assert out.returncode == 0 and "SAME" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("scan", [False, True])
def test_cache_is_updated_in_place(scan):
    """A decode step and an append write each layer's new keys and values into the cache where it
    lies. Taking a layer's slice out of the [L, B, S, Hkv, D] cache and setting it back (the code
    before) made XLA copy whole layer caches every step: 4.2 (7.4 under nn.scan) layer caches of
    scratch memory per decode program against 2.2 (2.5) now, the two being the attention's own
    reads of K and V, and decode 2.0x slower at batch 64 (README, Benchmarks). Unscanned layers
    now hold one cache array each, so not even those reads copy: 0.8 layer caches (session 13;
    2.2 with the stacked cache, whose layer slices XLA:CPU copied out for the attention)."""
    import dataclasses
    from tarl_jax.models import presets
    cfg = dataclasses.replace(presets.PRESETS["tiny"], scan_layers=scan)
    params = qwen.init_params(cfg, jax.random.key(0))
    batch, slots = 8, 512
    model = qwen.Decoder(cfg)
    state = sampler_lib.init_state(cfg, batch, slots)
    layer_cache = batch * slots * cfg.num_kv_heads * cfg.head_dim * 4
    row = np.full(batch, 0.3, np.float32)
    decode = sampler_lib._decode_jit.lower(
        model, params, state, jax.random.key(1), row, np.ones(batch, np.float32),
        np.zeros(batch, np.int32), np.full((batch, 4), -1, np.int32), np.full(batch, 8, np.int32),
        row, -1, None, np.zeros(batch, np.int32), steps=16, truncate=False).compile()
    append = sampler_lib._append_jit.lower(model, params, state, np.zeros((batch, 16), np.int32),
                                           np.full(batch, 16, np.int32), None).compile()
    assert decode.memory_analysis().temp_size_in_bytes < (3 if scan else 1) * layer_cache
    assert append.memory_analysis().temp_size_in_bytes < 6 * layer_cache
