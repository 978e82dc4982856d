"""moco_jax: MoCo v2 self-supervised pretraining in JAX/Flax."""
