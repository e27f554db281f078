"""The machinery every algorithm's run goes through: building a run, sampling and scoring, the update, the shared
loop, evaluation, checkpoints, tracking.
"""
