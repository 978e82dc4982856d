"""A run's lifecycle: config.json, config checks, checkpoints, guards, stopping, metrics, many processes."""
