"""Per-model-family plans: which stock diffusers modules get which parallel hook."""
