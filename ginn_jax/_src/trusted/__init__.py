"""Code that runs inside the trusted runtime (the TEE stand-in, a CPU device).

Nothing here imports from `ginn_jax._src.worker`.
"""
