"""megarlhf: reward models, DPO and PPO for Llama-family models on megatron-core."""

from megarlhf import import_hook

__version__ = "0.1.0"

# Before anything can import megatron-core: on a machine without a GPU, skip the parts of
# its import that only a GPU uses (~2 s per process; see megarlhf.import_hook).
import_hook.install()
