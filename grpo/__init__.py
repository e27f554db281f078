"""GRPO trainer for language models.

Importing this package is cheap: it pulls in neither vLLM nor DeepSpeed. Heavy
backends are imported only when a config chooses them.
"""

__version__ = "0.1.0"
