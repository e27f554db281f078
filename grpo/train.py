"""`python -m grpo.train`, the same as `grpo-train` (the module form is what launchers run):

    grpo-train                                   # the built-in demo: tiny model, arithmetic
    grpo-train algorithm=dr_grpo rollout.max_new_tokens=16 run_dir=runs/x
    grpo-train run_dir=runs/x resume=auto        # continue from runs/x's latest checkpoint
    torchrun --nproc_per_node 8 -m grpo.train backend=ddp experiment=...
"""

from grpo.cli import train_main as main

if __name__ == "__main__":
    main()
