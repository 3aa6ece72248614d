"""Test-wide setup: 8 simulated CPU devices, so sharding tests see a real mesh.

XLA_FLAGS must be set before jax initialises its backends, i.e. before the first
`import jax` anywhere in the test session.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
