"""recjax.profiling: per-op times of a compiled function from a jax.profiler trace."""

import jax
import jax.numpy as jnp
import pytest

from recjax import profiling


def test_op_times_of_a_jitted_function(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a = jnp.ones((256, 256))
  f(a, a).block_until_ready()
  times = profiling.op_times(lambda: f(a, a).block_until_ready(), steps=3,
                             log_dir=str(tmp_path))
  assert times and all(ms >= 0 for ms in times.values())
  assert list(times.values()) == sorted(times.values(), reverse=True)
  assert not any(name.startswith(profiling._WRAPPERS) for name in times)
  kinds = profiling.by_kind(times)
  assert sum(kinds.values()) == pytest.approx(sum(times.values()))
  text = profiling.format_op_times(times)
  assert "by kind:" in text and next(iter(times)) in text
  # A second trace in the same directory (within the same second) gets its own run.
  again = profiling.op_times(lambda: f(a, a).block_until_ready(), steps=1,
                             log_dir=str(tmp_path))
  assert again and len(list(tmp_path.glob("trace_*"))) == 2
  with pytest.raises(ValueError):
    profiling.op_times(lambda: None, steps=0, log_dir=str(tmp_path))
