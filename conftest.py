"""Test setup: 8 simulated CPU devices and strict numerics, set before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# Kernels (guides, notebooks) and subprocesses import this checkout's fsam_optax.
os.environ["PYTHONPATH"] = os.pathsep.join(
  filter(None, [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")])
)

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
