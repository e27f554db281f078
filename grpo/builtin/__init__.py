"""What lets the project run with no download: the tiny model, its warm start, the arithmetic task and its
preferences.
"""
