"""Self-supervised methods: each one a loss on two views and an update after the optimiser step."""
