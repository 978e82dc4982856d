"""Input data: sources, decoding, the decode cache and batching."""
