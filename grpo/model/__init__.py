"""The policy model: loading it, LoRA/QLoRA adapters, the memory plan, and the architecture facts of known models."""
