"""Judges score each agent turn -1/0/+1 (at most one -1); reward.py turns scores + outcome into R.

rules.judge: deterministic, from gold actions (offline default, LLM fallback).
llm.LLMJudge / llm.judge_batch / llm.judge_repeated: any OpenAI-compatible endpoint (imports `openai`).
reliability: agreement with the outcome, between judges, over repeats; also a CLI.
"""
from tarl_jax.judge.base import Judgement
from tarl_jax.judge.reward import trajectory_reward, turn_rewards

__all__ = ["Judgement", "trajectory_reward", "turn_rewards"]
