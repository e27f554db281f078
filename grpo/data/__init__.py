"""Prompts and their columns: reading datasets, reasoning-gym tasks, and decontamination against held-out splits."""
