r"""SASRec + FLAN-T5 (base / xl / xxl) joint model, set up for memory planning at scale.

A config for `--mode=plan` (`recjax/plan.py`): compiles one joint train step for a mesh from
shapes alone and reports per-device memory, parameters and FLOPs. No data is read
(`plan.num_items` gives the catalogue size). It is experiments/joint_ml100k.py with a FLAN-T5
preset as the LLM and the large-model memory options; training it for real needs the
checkpoint (`--config.llm.checkpoint=<HF dir>`) and an accelerator.

Command (CPU; simulated devices, nothing is allocated):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/main.py \
      --config experiments/joint_flan_t5_plan.py:flan-t5-xl --workdir /tmp/recjax/plan \
      --mode=plan --plan_mesh=1,8,1 --plan_batch=256 --plan_out=/tmp/recjax/plan/xl.json
The argument after ":" picks the T5 preset (default flan-t5-xl); every field below can be
overridden, e.g. --config.mesh.rules=fsdp_tp --config.llm.remat_policy=dots.
experiments/plan_joint_t5.py runs the whole (model x mesh) table of the README.

Hardware: any CPU (2 cores here). Time: ~1-2 min per xl plan (measured in
experiments/plan_joint_t5.py). Expected result: flan-t5-xl + SASRec fits one 80 GiB device
with these settings (bf16 T5 params and activations, Adafactor, full remat).
To *train* with it, set --config.llm.param_dtype=float32 (bf16 compute stays) or
--config.optim.ema_decay=0: the joint loop refuses a bf16 moving average (it would never
move), and bf16 parameters without a float32 master copy lose updates below half an ulp.
"""

import os

import ml_collections

from recjax.configs import load_config_file


def _joint_ml100k() -> ml_collections.ConfigDict:
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "joint_ml100k.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _joint_ml100k()            # data, prompts, SASRec, bridge, loss as the ML-100K run
  c.crm.dtype = "float32"                 # activations: "float32" | "bfloat16"

  # The LLM: a FLAN-T5 preset in full (no width overrides), bf16, remat.
  c.llm = ml_collections.ConfigDict()
  c.llm.preset = arg or "flan-t5-xl"      # flan-t5-base, flan-t5-xl, flan-t5-xxl, ...
  c.llm.dropout_rate = 0.1
  c.llm.checkpoint = ""                   # HF directory to convert; "" = random init
  c.llm.dtype = "bfloat16"                # T5 activations
  c.llm.param_dtype = "bfloat16"          # T5 parameters, gradients, optimizer inputs
  c.llm.remat_policy = "full"             # recompute each T5 block in the backward pass
  # "einsum" (attention dropout), or "cudnn" on NVIDIA GPUs (fused flash attention, 84 vs
  # 96 ms for a flan-t5-base step on an H200; needs dropout_rate=0): README "FLAN-T5 on a GPU".
  c.llm.attention_impl = "einsum"
  # The joint model needs every encoder layer's hidden state for the alignment and
  # refuses scanned layers (recjax.models.joint.JointConfig).
  c.llm.scan_layers = False

  c.bridge.gate_bias_init = 0.0
  c.bridge.align_pairs = ((4, 0), (8, 1))   # valid for every preset (>= 8 layers)
  # "cache": title encodings are an input refreshed by the loop. "step" would encode all
  # N + 1 titles with T5 inside every step (27k tokens for ML-100K: at XL/XXL size that
  # dwarfs the prompt batch).
  c.bridge.title_mode = "cache"

  # Adafactor (recjax.train.optimizer): factored second moments, no momentum.
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adafactor"
  c.optim.lr = 1e-3
  c.optim.tower_lr = {"llm": 1e-4}
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0                 # per tower

  c.input.batch_size = 256
  c.train.num_steps = 20000
  c.train.batch_size = 256
  c.train.grad_accum = 1                  # micro-batches per step (one jit, one update)

  # --mode=plan (recjax/plan.py).
  c.plan = ml_collections.ConfigDict()
  c.plan.num_items = 1682                 # ML-100K's catalogue, so no data is read
  c.plan.num_targets = 10                 # CRM targets per row (the loop's stride)
  c.plan.grad_accum = ml_collections.config_dict.placeholder(int)  # None: train's

  c.mesh.shape = (1, -1, 1)
  c.mesh.rules = "fsdp"                   # "fsdp" or "fsdp_tp" (then a tensor axis > 1)
  return c
