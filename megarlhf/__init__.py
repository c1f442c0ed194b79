"""megarlhf: reward models, DPO and PPO for Llama-family models on megatron-core."""

__version__ = "0.1.0"
