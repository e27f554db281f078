"""Learned preference reward model: Bradley-Terry training and a scorer that is a reward function.

- `reward_models.train`: `grpo-rm-train`, `train_reward_model(RMConfig)` (TRL's `RewardTrainer`), metrics.
- `reward_models.data`: preference pairs (`prompt`, `chosen`, `rejected`) from JSONL/Parquet/`datasets`, checked.
- the built-in preference set (the policy's own right vs wrong answers) lives with the built-in task, in
  `grpo.builtin.arithmetic_preferences`.
- `reward_models.scorer`: the `reward_model` reward (``name: reward_model`` in the config; also reachable as
  ``reward_models.scorer:reward_model``), loading a trained model once per process.

Importing this package imports nothing heavy; the submodules load torch, transformers and TRL.
"""
