"""Pure math of preference learning: torch only (no megatron, no config objects)."""
