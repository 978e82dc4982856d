"""The train state, the optimisers and schedules, and the sharded step of every method."""
