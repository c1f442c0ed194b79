"""Evaluation: exact match (GSM8k-style and the built-in task), IFEval-style rule checks,
best-of-N with a reward model, reward-model pair accuracy (``megarlhf eval``)."""
