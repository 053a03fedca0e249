"""Evaluation: perplexity, tasks (multiple choice, generation, classification, code, summarization), lm-eval adapter."""
