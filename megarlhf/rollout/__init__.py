"""Generation from the policy: KV-cached sampling on megatron weights."""
