"""Shared test setup: 8 simulated CPU devices, float32, absl flags parsed."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402
import jax  # noqa: E402

# grain workers and absl-using code expect parsed flags.
flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")
