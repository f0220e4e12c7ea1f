"""Training an adapted graph: LoRA+ parameter groups, lfx.Trainer, schedules, resumable checkpoints.

Read `trainer.py` first; `loraplus.py` holds the optimizer rule.
"""
