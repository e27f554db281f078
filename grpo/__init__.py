"""GRPO trainer for language models.

Importing this package is cheap: it pulls in neither vLLM nor DeepSpeed. Heavy
backends are imported only when a config chooses them.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes (model.lora.qlora's 4-bit base), which peft imports whenever it is installed, warns at import on
# CPUs with AVX512-BF16 that an optional kernel package is missing. That kernel serves a weight layout that
# grpo.model.lora.prepare_quantized switches off, so the warning would be noise on every run's stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
