"""Shared test setup: 8 simulated CPU devices, float32, absl flags parsed, and a persistent
XLA compilation cache (env vars, so launcher subprocesses share it): tests that train the
same tiny model several times (resume, eval mode, meshes) compile each program once."""

import os
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "recjax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

from absl import flags  # noqa: E402
import jax  # noqa: E402

# grain workers and absl-using code expect parsed flags.
flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")
