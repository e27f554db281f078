"""What the trainer does to a model it loads, before training it.

Dropout is turned off (`model.dropout=false`, the default). With dropout on, the log-probs the
trainer computes for a completion are not those the sampler drew it with, the PPO ratio is
noised at 1 before any update, and a critic's values (GAE, the returns, the value-clip anchor)
are noised too. TRL and verl turn it off for the same reason.
"""

from __future__ import annotations

import torch


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability in `model` to 0: `nn.Dropout` modules, and the attention
    dropout rates that attention modules keep as float attributes. Returns the names changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed.append(name)
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout = 0.0
            changed.append(f"{name}.attention_dropout")
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "classifier_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, key, None), float) and getattr(config, key) > 0:
            setattr(config, key, 0.0)  # so a saved checkpoint says what was trained
    return changed
