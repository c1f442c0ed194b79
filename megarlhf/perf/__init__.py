"""Performance models: FLOPs per token, memory per GPU, layout planning, device probes."""
