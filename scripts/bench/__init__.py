"""Benchmarks: speed and memory of the GRPO step, rollout, log-probs, rewards and ZeRO stages."""
