"""Offline data preparation (no JAX imports: safe to run in forked/spawned worker pools)."""
