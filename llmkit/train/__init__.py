"""Training: one loop (loop.py), objectives as loss functions, checkpoints, distributed setup."""
