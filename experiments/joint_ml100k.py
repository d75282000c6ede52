r"""SASRec + FLAN-T5-small joined by the knowledge bridge on MovieLens-100K (config only).

STATUS: the model, the joint objective, the masked one-jit step and the stage schedules
exist and are tested (tests/test_joint*.py, tests/test_bridge.py, tests/test_routing.py);
the training loop that feeds joint batches (prompts, item titles) is NOT written yet, so
there is no command, time or expected metric to state. `recjax.train.joint_task.
build_joint_task(config, num_items)` turns this config into a `JointTask`.

Intended protocol: as experiments/sasrec_ml100k.py (leave-one-out, full ranking over all
items, history not excluded), reporting the CRM, the LLM head, and the routing curve
(LLM fraction 0, 0.1, 0.2, 0.5, 1).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "ml-100k"                 # see recjax.data.load_sequence_data
  c.data.data_dir = "~/.cache/recjax/data"
  c.data.cache_dir = "~/.cache/recjax/preprocessed"
  c.data.title_len = 16                   # title tokens per item (catalogue encodings)
  c.data.prompt_len = 64                  # prompt tokens (item tokens count one each)

  # The CRM: SASRec, as experiments/sasrec_ml100k.py.
  c.crm = ml_collections.ConfigDict()
  c.crm.max_len = 50
  c.crm.hidden = 64
  c.crm.num_blocks = 2
  c.crm.num_heads = 2
  c.crm.mlp_dim = 256
  c.crm.dropout = 0.5
  c.crm.attn_dropout = 0.5
  c.crm.item_table_multiple = 8           # item rows divisible by the tensor axis

  # The LLM: a recjax.models.t5 preset and overrides.
  c.llm = ml_collections.ConfigDict()
  c.llm.preset = "flan-t5-small"
  c.llm.dropout_rate = 0.1
  c.llm.checkpoint = ""                   # HF directory to convert; "" = random init

  # The bridge: which directions exist (recjax.models.bridge.BridgeConfig).
  c.bridge = ml_collections.ConfigDict()
  c.bridge.memory_dim = 64                # shared item memory width
  c.bridge.user_memory = False            # per-user memory row (adds num_users rows)
  c.bridge.crm_to_llm = True              # SASRec user state -> soft prompts
  c.bridge.num_soft_prompts = 4           # k soft prompt vectors
  c.bridge.item_tokens = True             # item placeholders embedded from the memory
  c.bridge.llm_to_crm = True              # title encodings gated into item embeddings
  c.bridge.gate_bias_init = 0.0           # initial gate logit
  # (T5 encoder hidden index 0..8, SASRec block) pairs for the layer-wise alignment.
  c.bridge.align_pairs = ((4, 0), (8, 1))
  c.bridge.align_dim = 64
  c.bridge.title_mode = "step"            # "step": fresh, in the jit; "cache": refreshed

  # The objective (recjax.train.joint_task.JointTask).
  c.loss = ml_collections.ConfigDict()
  c.loss.kl_direction = "crm_llm"         # KL(p_crm || p_llm): the CRM teaches
  c.loss.kl_stop_grad = "crm"             # no gradient into the teacher side
  c.loss.kl_temperature = 1.0
  c.loss.align_p = 2.0                    # ||.||_2^p
  # Stages (recjax.train.stages.SCHEDULES): "corella", "delrec" or "joint".
  c.loss.schedule = "corella"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.tower_lr = {"llm": 3e-4}        # per-tower overrides
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0                 # per tower

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 20000
  c.train.batch_size = 32
  c.train.title_refresh_steps = 200       # title_mode "cache" only

  c.routing = ml_collections.ConfigDict()
  c.routing.fractions = (0.0, 0.1, 0.2, 0.5, 1.0)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)
  c.mesh.rules = "dp"
  return c
