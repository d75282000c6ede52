r"""SASRec + a small T5 trained from scratch + the knowledge bridge, on MovieLens-100K.

Command (CPU, a fresh machine; downloads ML-100K on first use, trains a SentencePiece
vocabulary on the item titles):
  python launch/main.py --config experiments/joint_ml100k.py \
      --workdir /tmp/recjax/joint_ml100k

Hardware: 2 CPU cores. Time: about 10-12 minutes (training 589-614 s for seeds 1 and 2;
`experiments/bench_joint_ml100k.py` runs the seeds and ablations).
Protocol: as experiments/sasrec_ml100k.py (leave-one-out, full ranking over all 1,682
items, history not excluded). Reported: the joint model's CRM (SASRec reading the bridged
item table), its LLM head (T5 decoder state . bridged items), and CRM-entropy routing at
LLM fractions 0, 0.1, 0.2, 0.5, 1 (`routing_curve.json`, `routing_curve.png`).
Expected result (3 seeds, measured; README "Joint model on MovieLens-100K"): CRM head test
NDCG@10 0.0576 +- 0.0013 (SASRec alone 0.0627), LLM head 0.0545 +- 0.0037, routing 20-30% of
users to the LLM ~0.058. About 10 minutes of training on a quiet 2-core CPU.

The schedule is "joint" (every loss at once: CRM CE + LLM item CE + 0.1 KL(CRM || LLM) +
0.1 layer alignment); `--config.loss.schedule=corella` or `=delrec` run the staged recipes
(`recjax.train.stages`). For a pretrained FLAN-T5 set `--config.llm.checkpoint=<HF dir>`
and make the llm.* sizes match it (`llm.preset` plus d_model, d_kv, num_heads, d_ff,
num_layers, num_decoder_layers, vocab_size as in the checkpoint's config.json; a mismatch is
refused with the shapes); its tokenizer then replaces the trained vocabulary. `llm.text_head=True` keeps
the checkpoint's token head, for title generation (`JointTask.generate`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "ml-100k"                 # see recjax.data.load_sequence_data
  c.data.data_dir = "~/.cache/recjax/data"
  c.data.cache_dir = "~/.cache/recjax/preprocessed"
  c.data.download = True
  c.data.min_rating = ml_collections.config_dict.placeholder(float)
  c.data.dedup = "none"
  c.data.k_core = 0
  c.data.min_user_interactions = 3
  c.data.max_seq_len = 0
  c.data.time_order = "exact"             # or "recbole": RecBole 1.2.1's split

  # Prompts (recjax.data.prompts.PromptConfig) and the from-scratch vocabulary.
  c.prompt = ml_collections.ConfigDict()
  c.prompt.prompt_len = 64                # T5 encoder tokens (soft prompts come on top)
  c.prompt.num_items = 10                 # most recent items offered to the prompt
  c.prompt.title_len = 12                 # tokens per title
  c.prompt.item_repr = "title+token"      # "title" | "token" | "title+token"
  c.prompt.prefix = "user watched:"
  c.prompt.separator = ";"
  c.prompt.suffix = "what next?"
  c.text = ml_collections.ConfigDict()
  c.text.vocab_size = 2000                # SentencePiece on titles/years/genres

  # The CRM: SASRec exactly as experiments/sasrec_ml100k.py.
  c.crm = ml_collections.ConfigDict()
  c.crm.max_len = 50
  c.crm.hidden = 64
  c.crm.num_blocks = 2
  c.crm.num_heads = 2
  c.crm.mlp_dim = 256
  c.crm.dropout = 0.5
  c.crm.attn_dropout = 0.5
  c.crm.mlp_dropout = 0.0
  c.crm.activation = "gelu"
  c.crm.norm_first = False
  c.crm.layer_norm_eps = 1e-12
  c.crm.init_std = 0.02
  c.crm.position_mode = "from_end"
  c.crm.item_table_multiple = 8           # item rows divisible by the tensor axis

  # The LLM: a T5 v1.1 of small width trained from scratch here (no pretrained weights
  # are reachable on this machine); a recjax.models.t5 preset plus overrides. The item
  # head needs one decoder step, so one decoder layer suffices.
  c.llm = ml_collections.ConfigDict()
  c.llm.preset = "flan-t5-small"
  c.llm.d_model = 128
  c.llm.d_kv = 32
  c.llm.num_heads = 4
  c.llm.d_ff = 256
  c.llm.num_layers = 2
  c.llm.num_decoder_layers = 1
  c.llm.vocab_size = 0                    # checkpoint only (0 = the preset's); from scratch
                                          # the trained vocabulary, rounded up to 128
  c.llm.dropout_rate = 0.1
  c.llm.checkpoint = ""                   # HF directory to convert; "" = from scratch
  c.llm.text_head = False                 # no T5 token head: item losses never train it

  c.bridge = ml_collections.ConfigDict()
  c.bridge.memory_dim = 64                # shared item memory width
  c.bridge.user_memory = False
  c.bridge.crm_to_llm = True              # SASRec user state -> soft prompts
  c.bridge.num_soft_prompts = 4
  c.bridge.item_tokens = True             # item placeholders embedded from the memory
  c.bridge.llm_to_crm = True              # title encodings gated into item embeddings
  c.bridge.gate_bias_init = -2.0          # titles start mostly gated off
  c.bridge.align_pairs = ((1, 0), (2, 1)) # (T5 encoder hidden index, SASRec block)
  c.bridge.align_dim = 64
  c.bridge.align_crm_pool = "last"        # SASRec side: state after the last item, or "mean"
  c.bridge.title_mode = "cache"           # refreshed every title_refresh_steps
  # False: the LLM losses do not reach SASRec (stop-gradient); True trains SASRec through
  # the soft prompts and the item head too, which cost the CRM head half its NDCG@10 here.
  c.bridge.llm_grad_to_crm = False

  c.loss = ml_collections.ConfigDict()
  c.loss.kl_direction = "crm_llm"         # KL(p_crm || p_llm): the CRM teaches
  c.loss.kl_stop_grad = "crm"
  c.loss.kl_temperature = 1.0
  c.loss.align_p = 2.0
  c.loss.schedule = "joint"               # "joint" | "corella" | "delrec"

  c.input = ml_collections.ConfigDict()
  c.input.stride = 10                     # as sasrec_ml100k
  c.input.batch_size = 32

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.tower_lr = {"llm": 1e-3}        # per-tower overrides
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 200
  c.optim.final_lr_fraction = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0                 # per tower; 0 = off
  c.optim.ema_decay = 0.998

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 12                 # of all training windows
  c.train.eval_every_steps = 0            # 0 = once per epoch
  c.train.log_every_steps = 50
  c.train.patience = 0                    # evaluations; 0 = no early stop
  c.train.monitor = "crm/ndcg@10"         # "crm/<metric>" or "llm/<metric>", valid
  c.train.title_refresh_steps = 0         # 0 = at every evaluation
  c.train.subsets = {"subset_a": 0.3, "subset_b": 0.3}   # corella's stage data
  c.train.async_checkpoints = False
  c.train.fast_compile = False            # True: cheap XLA options (tests; slower steps)

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (5, 10, 20)
  c.eval.batch_size = 256
  c.eval.exclude_history = False

  c.routing = ml_collections.ConfigDict()
  c.routing.fractions = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)
  c.mesh.rules = "dp"
  return c
