"""The train state, the optimisers and schedules, the sharded step and the pretraining loop."""
