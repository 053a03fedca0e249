"""Evaluation: perplexity, a task registry (multiple choice, generation, classification, code,
summarization) on packaged data, reports, and an lm-evaluation-harness adapter (`harness.py`).

    from llmkit.eval import evaluate, perplexity
    result = evaluate(model, tokenizer, ["sentiment", "arithmetic"], shots=5, limit=100)
    result["results"]["sentiment"]["acc"]
    rag = configure("squad_closedbook", retrieve=my_retriever)   # closed-book QA with retrieved passages
"""

from llmkit.eval.perplexity import perplexity
from llmkit.eval.runner import evaluate, write_report
from llmkit.eval.tasks import Task, configure, get_task, known_tasks, register

__all__ = ["evaluate", "perplexity", "write_report", "Task", "configure", "get_task", "known_tasks", "register"]
