"""The Feast feature repository: declarations only (``feast apply`` scans this folder)."""
