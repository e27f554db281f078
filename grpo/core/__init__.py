"""Pure tensor code: rollout batches, advantage estimators, policy losses, log-probs, packing. Imports nothing else
of `grpo`.
"""
