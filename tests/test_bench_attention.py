"""bench/attention.py on a micro shape: every variant computes the same update (equal first-step
losses), and the limits table divides train_flops' count for the bench's own packed batch by each
variant's best time and by the machine's matmul rate."""
import dataclasses
import re

from tarl_jax.bench import attention as B
from tarl_jax.models import presets


def test_variants_agree_and_the_limits_table_uses_the_batch_segments(monkeypatch, capsys):
    lim = B.limits.Limits(matmul_f32=1e9, matmul_bf16=1e9, bandwidth=1e9, n=8, mb=1)
    monkeypatch.setattr(B.limits, "measure", lambda: lim)
    B.main(["--shape", "micro", "--rows", "2", "--seq", "64", "--segment", "20",
            "--chunks", "16,16s", "--rounds", "1"])
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"first-step loss ([\d.]+)", out)]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-5, losses
    assert lim.line() in out and "(MLP)" in out and "(an attention block)" in out
    batch = B.packed_batch(2, 64, 20, presets.get("micro").vocab_size)
    for c in ("0", "16", "16s"):
        row = re.search(rf"^\| {c} \| (\S+) \| (\S+) \| ([\d.]+) \| (\S+) \| ([\d.]+)% \|$", out, re.M)
        assert row, (c, out)
        cfg = dataclasses.replace(presets.get("micro"), attn_chunk=int(c.rstrip("s")),
                                  attn_sparse=c.endswith("s"))
        scored = batch["policy_index"].shape[1]           # the loss mask's positions, bucketed
        assert 0 < scored < 64
        model, executed = B.aot.train_flops(cfg, 2, 64, scored, batch["segment_ids"])
        assert row[1] == f"{model / 1e9:.3g}" and row[2] == f"{executed / 1e9:.3g}"
        # GFLOP/s = model / best s (printed to the millisecond, so within the rounding's span);
        # the fraction divides it by the 1 GFLOP/s machine above
        best, rate = float(row[3]), float(row[4])
        assert model / (best + 5e-4) / 1e9 * 0.995 <= rate <= model / (best - 5e-4) / 1e9 * 1.005
        assert abs(float(row[5]) - 100 * float(row[4])) <= 0.005 * float(row[5])
    # the sparse variant computes fewer scores than the grouped one on short segments
    shares = dict(re.findall(r"^\s+(0|16s?)\s+([\d.]+)\s", out, re.M))
    assert float(shares["16s"]) < float(shares["16"]) < float(shares["0"]) == 1.0, shares
