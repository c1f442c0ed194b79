"""Tokenizers, chat templates, datasets, the built-in task."""
