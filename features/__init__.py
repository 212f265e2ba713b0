"""Features room: the Feast repository and typed read/write helpers."""
