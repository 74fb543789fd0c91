"""The soak benchmark runs end to end at a small size (its numbers come from the full run in
the README), and its growth rule reads the samples after the warm-up."""
import json

from tarl_jax.bench import soak


def test_soak_runs_and_reports(tmp_path):
    out = tmp_path / "soak.json"
    rc = soak.main(["--episodes", "40", "--requests", "8", "--blocks", "4", "--margin", "100",
                    "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and [s["done"] for s in report["episodes"]] == [10, 20, 30, 40]
    assert all(s["solved"] == 1.0 for s in report["episodes"])     # the expert solves every task
    assert [s["done"] for s in report["requests"]] == [2, 4, 6, 8]
    assert all(s["tokens"] > 0 for s in report["requests"])
    assert set(report["growth"]) == {"episodes", "requests"}


def test_growth_is_the_largest_sample_after_the_warm_up():
    samples = [{"rss_mib": r, "threads": 2, "fds": 10} for r in (50, 100, 104, 101, 110, 102,
                                                                   100, 100, 100, 100)]
    g = soak.growth(samples)      # warm-up: the first 2 of 10; base 100, largest after it 110
    assert abs(g["rss_mib"] - 0.10) < 1e-9 and g["threads"] == 0 and g["fds"] == 0
