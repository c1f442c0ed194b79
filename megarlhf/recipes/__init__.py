"""Entry points that read top to bottom: sft, reward_model, dpo, ppo."""
