"""`recjax.plan`: the step compiled from shapes reports the real parameter count, positive
memory, and works on a mesh of 8 simulated devices."""

import importlib.util
import os

import jax
import pytest

from recjax import plan as plan_lib
from recjax.train.joint_task import build_joint_task

import joint_testing as jt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _tiny_config():
  """experiments/joint_flan_t5_plan.py shrunk to the tiny joint model of joint_testing."""
  c = _experiment_config("joint_flan_t5_plan", "flan-t5-small")
  c.crm.update(max_len=jt.MAX_LEN, hidden=16, num_blocks=2, num_heads=2, mlp_dim=32)
  c.llm.update(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)
  c.bridge.update(memory_dim=16, num_soft_prompts=2, align_pairs=((1, 1),), align_dim=8)
  c.llm.update(dtype="float32", param_dtype="float32")   # CPU tests stay float32
  c.data.update(prompt_len=jt.PROMPT_LEN, title_len=jt.TITLE_LEN)
  c.plan.update(num_items=jt.NUM_ITEMS, num_targets=jt.TARGETS)
  return c


@pytest.fixture(scope="module")
def single_device_plan():
  return plan_lib.plan(_tiny_config(), (1, 1, 1), 8, grad_accum=2)


def test_plan_counts_the_real_parameters(single_device_plan):
  config = _tiny_config()
  task = build_joint_task(config, jt.NUM_ITEMS)
  params = jt.jit(task.init)(jax.random.key(0))
  real = {t: sum(x.size for x in jax.tree.leaves(params[t])) for t in params}
  report = single_device_plan
  assert report["params"] == {"total": sum(real.values()), **real}
  assert report["param_bytes"] == 4 * sum(real.values())


def test_precision_is_set_from_the_config():
  """The experiment's bf16 T5 (params and activations) and a clear error for a typo."""
  config = _tiny_config()
  config.llm.update(dtype="bfloat16", param_dtype="bfloat16")
  task = build_joint_task(config, jt.NUM_ITEMS)
  assert task.cfg.llm.dtype == jax.numpy.bfloat16 and task.cfg.crm.dtype == "float32"
  params = jax.eval_shape(task.init, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params["llm"])} == {jax.numpy.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(params["crm"])} == {jax.numpy.dtype("float32")}
  config.llm.dtype = "bf16"
  with pytest.raises(ValueError, match="llm.dtype"):
    build_joint_task(config, jt.NUM_ITEMS)


def test_memory_and_flops_are_reported(single_device_plan):
  report = single_device_plan
  b = report["bytes_per_device"]
  for key in ("arguments", "outputs", "temp", "params", "opt_state", "total"):
    assert b[key] > 0, key
  assert b["total"] == b["arguments"] + b["outputs"] + b["temp"] - b["alias"]
  assert b["params"] == report["param_bytes"]      # one device holds everything
  assert report["flops"]["xla_per_device"] > 0 and report["flops"]["analytic_6nt"] > 0
  assert report["fits"] == {"16GiB": True, "32GiB": True, "80GiB": True, "95GiB": True}
  assert report["grad_accum"] == 2 and report["rows_per_device_per_micro_batch"] == 4
  text = plan_lib.format_plan(report)
  assert "opt_state" in text and "fits" in text
  assert "| 1 | (1, 1, 1) | 8 x 2 |" in plan_lib.markdown_table([report])


def test_plan_on_eight_simulated_devices(single_device_plan):
  assert jax.device_count() == 8
  config = _tiny_config()
  report = plan_lib.plan(config, (2, 2, 2), 16, rules="fsdp_tp")
  assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["params"] == single_device_plan["params"]
  # Sharded parameters: one device holds less than the whole model.
  assert report["bytes_per_device"]["params"] < report["param_bytes"]
  assert report["bytes_per_device"]["total"] > 0


def test_plan_needs_enough_devices():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    plan_lib.plan(_tiny_config(), (2, 8, 1), 16)


def test_sasrec_analytic_flops_follow_the_truncated_last_block():
  """Every matmul at all L rows when S == L; with S < L the last block's output projection
  and feed-forward (not its fused q/k/v) run at S rows only."""
  import flax.linen as nn
  import jax.numpy as jnp
  from recjax.models.sasrec import SASRec, SASRecConfig
  cfg = SASRecConfig(num_items=30, max_len=12, hidden=16, num_blocks=2, num_heads=2,
                     mlp_dim=32)
  params = jax.eval_shape(lambda r: nn.unbox(SASRec(cfg).init(
      r, jnp.zeros((1, 12), jnp.int32)))["params"], jax.random.key(0))
  b, l = 4, 12
  kernels = 2 * (16 * 3 * 16 + 16 * 16 + 16 * 32 + 32 * 16)   # qkv, out, wi, wo per block
  assert plan_lib._sasrec_matmul_tokens(params, cfg, b, l, l) == kernels * b * l
  at_s = 16 * 16 + 16 * 32 + 32 * 16                            # last block: out, wi, wo
  assert plan_lib._sasrec_matmul_tokens(params, cfg, b, l, 3) == (
      kernels * b * l - at_s * b * (l - 3))
