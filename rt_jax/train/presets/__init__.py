"""Training presets, one small file each; ``rt_jax.train.config.get_preset(name)`` loads them."""
