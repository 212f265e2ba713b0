"""Composition root: settings, the `osmf` command, embedded stack, simulator, replay."""
