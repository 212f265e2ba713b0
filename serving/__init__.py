"""Serving room: Triton model repository, server process, client."""
