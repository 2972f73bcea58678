"""Hand-written kernels behind `jax.ffi`, used where XLA's own code is the bound (see cpu.py)."""
