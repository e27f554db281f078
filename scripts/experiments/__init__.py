"""Experiments that rerun training to produce the comparison tables the docs cite."""
