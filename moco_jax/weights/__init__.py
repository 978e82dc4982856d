"""torch <-> Flax weights: torchvision names both ways, and the official MoCo checkpoints read in."""
