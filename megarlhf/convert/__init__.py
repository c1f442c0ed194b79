"""Checkpoint conversion between Hugging Face and megatron-core formats."""
