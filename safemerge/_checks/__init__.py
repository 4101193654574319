"""Verification: in memory, the saved files, the reload."""
