"""Training: one loop (loop.py, one `TrainingStep`), the objectives it runs (objectives.py; their losses
are in llmkit/losses.py), checkpoints, distributed setup, and the recipes around the loop: pretrain,
finetune, reward, dpo, ppo, distill; each is `run(config) -> TrainResult` and writes its report
with report.py."""
