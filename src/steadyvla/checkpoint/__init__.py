"""Checkpoints: atomic, verified, resumable (layout, manifest, manager, async writer)."""
