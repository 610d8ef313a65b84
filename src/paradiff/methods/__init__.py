"""Parallel methods: each module is a plan of module wrappers/hooks applied to an unchanged diffusers model."""
