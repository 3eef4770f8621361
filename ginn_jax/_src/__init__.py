"""Private implementation of ginn_jax. Import public names from `ginn_jax`."""
