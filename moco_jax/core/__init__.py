"""The bottom layer: the device mesh and collectives, the user-error types, atomic file writes."""
