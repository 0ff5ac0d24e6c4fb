"""The BLOOM family (bloom)."""
