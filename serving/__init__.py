"""Serving room: renderers, Triton model repository, server process, client for ad systems."""
