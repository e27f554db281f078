"""`grpo-compare`: the same task and budget under several algorithms, and a report whose intervals say which
differences are real.
"""
