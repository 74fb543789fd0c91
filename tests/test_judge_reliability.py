"""Reliability metrics by hand, and the CLI end to end on gpt-4o's 200 airline dialogues."""
import json

import pytest

from tarl_jax.judge import reliability
from tarl_jax.judge.base import Judgement
from tarl_jax.judge.reward import trajectory_reward


def J(*scores):
    return Judgement(list(scores), [""] * len(scores), "test")


def test_outcome_agreement_by_hand():
    js = [J(1, -1), J(0, -1), J(1, 1), J(0, 0), None]
    r = reliability.outcome_agreement(js, [0, 1, 1, 0, 1])
    assert r["table"] == {"neg_fail": 1, "neg_success": 1, "clean_fail": 1, "clean_success": 1}
    assert r["n"] == 4 and r["p_fail_given_neg"] == 0.5 and r["p_clean_given_success"] == 0.5
    assert reliability.outcome_agreement([J(1)], [1])["p_fail_given_neg"] is None


def test_judge_agreement_and_kappa_by_hand():
    a = [J(1, -1, 0), J(0, 0), None]
    b = [J(1, 0, -1), J(0, 0), J(1)]
    r = reliability.judge_agreement(a, b)
    assert r["trajectories"] == 2 and r["skipped"] == 1 and r["turns"] == 5
    assert r["turn_exact_agreement"] == pytest.approx(3 / 5)
    # p_o = 3/5; marginals a: -1 .2, 0 .6, 1 .2 ; b the same -> p_e = .04+.36+.04 = .44
    assert r["turn_kappa"] == pytest.approx((0.6 - 0.44) / (1 - 0.44))
    assert r["neg_presence_agreement"] == 1.0 and r["neg_same_turn_when_both"] == 0.0
    assert r["confusion_a|b"]["-1|0"] == 1 and r["confusion_a|b"]["0|-1"] == 1
    assert reliability.cohen_kappa([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="2 vs 1 turns"):
        reliability.judge_agreement([J(1, 1)], [J(1)])


def test_repeat_variance_by_hand():
    runs = [[J(1, -1), J(1)], [J(1, 0), J(1)], [J(1, 0), None]]
    r = reliability.repeat_variance(runs, [1, 0])
    # trajectory 0: turn 2 scores -1, 0, 0 -> pvariance 2/9; trajectory 1 has 2 repeats of [1]
    assert r["trajectories"] == 2
    assert r["turn_score_var_mean"] == pytest.approx((0 + 2 / 9 + 0) / 3)
    rewards = [trajectory_reward([1, -1], 1), trajectory_reward([1, 0], 1), trajectory_reward([1, 0], 1)]
    mean = sum(rewards) / 3
    assert r["reward_var_mean"] == pytest.approx(sum((x - mean) ** 2 for x in rewards) / 3 / 2)
    assert r["neg_presence_flip_rate"] == 0.5 and r["neg_turn_flip_rate"] == 0.5
    # pairs of trajectory 0: (1,-1)~(1,0) 1 of 2, (1,-1)~(1,0) 1, (1,0)~(1,0) 2; trajectory 1: 1 of 1
    assert r["pair_exact_agreement"] == pytest.approx((1 + 1 + 2 + 1) / (2 + 2 + 2 + 1))
    # The -1 moving between turns is a turn flip but not a presence flip.
    moved = reliability.repeat_variance([[J(-1, 1)], [J(1, -1)]], [0])
    assert moved["neg_presence_flip_rate"] == 0.0 and moved["neg_turn_flip_rate"] == 1.0
    assert moved["turn_score_var_mean"] == 1.0 and moved["pair_exact_agreement"] == 0.0
    # A fallback verdict is another judge's: it neither adds consistency nor disagreement.
    fb = Judgement([1, 1], ["", ""], "rule", {"fallback_from": "llm"})
    skipped = reliability.repeat_variance([[fb], [fb], [J(1, -1)]], [0])
    assert skipped["trajectories"] == 0 and skipped["turn_score_var_mean"] is None
    with pytest.raises(ValueError, match=r"scored \[2, 1\] turns"):
        reliability.repeat_variance([[J(1, 1)], [J(1)]], [0])


def test_cli_rule_judge_on_gpt4o_airline(taubench_dir, capsys, tmp_path):
    path = taubench_dir / "v1/trajectories/airline_gpt-4o.jsonl"
    report = reliability.main(["--episodes", str(path), "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert "P(fail | -1)" in printed and json.loads((tmp_path / "r.json").read_text()) == report
    lines = [json.loads(x) for x in path.open()]
    assert report["episodes"] == 200
    assert report["success_rate"] == pytest.approx(sum(d["reward"] for d in lines) / 200)
    rule = report["judges"]["rule"]
    t = rule["vs_outcome"]["table"]
    assert sum(t.values()) == 200 and t["neg_fail"] + t["clean_fail"] == 103
    # Every failed gpt-4o dialogue contains a wrong, unrequested or missing write (or an unsaid
    # output), and the rule judge puts its single -1 there.
    assert rule["vs_outcome"]["p_neg_given_fail"] == 1.0
    # -1s on successes are mostly transfers to a human (tau-bench's database check cannot see them)
    kinds = rule["rewards"]["negative_kinds"]
    assert kinds["transfer"]["success"] > t["neg_success"] / 2
    assert rule["vs_outcome"]["p_fail_given_neg"] > 0.6
    r = rule["rewards"]
    assert r["fallbacks"] == 0 and r["dropped"] == 0
    assert 5 <= r["reward_mean_success"] <= 15 and -5 <= r["reward_mean_fail"] < 0
    assert report["agreement"] == {}
