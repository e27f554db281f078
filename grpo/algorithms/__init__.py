"""One module per algorithm's step (GRPO, PPO, DPO, online DPO, RFT/SFT, the preference update), each run by the
shared loop.
"""
