"""Pieces shared by the training recipes: DDP and optimizer set-up, schedule-driven steps."""
