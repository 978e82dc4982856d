"""Frozen-backbone evaluation: features, kNN, linear probes, export and the report."""
