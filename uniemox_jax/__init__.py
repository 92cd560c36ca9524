"""uniemox-jax: UniEmoX pretraining and emotion fine-tuning in JAX/Flax."""
