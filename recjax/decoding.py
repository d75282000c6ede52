"""Decoding and scoring for encoder-decoder LMs (the FLAN-T5 tower).

Two layers:

* Generic algorithms over a step function
  `tokens_to_logits(token_ids int32[N, 1], cache, step int32[]) ->
  (logits float32[N, V], new_cache)`: `greedy_search`, `temperature_sample`
  and `beam_search`, each one `jax.lax.while_loop` with static shapes. They
  know nothing about T5; every cache leaf with ndim >= 1 must have the batch
  as its leading axis (beam search expands it to batch * beams and reorders
  it), scalar leaves are carried through untouched. Each algorithm can be
  constrained by a prefix `Trie` (recjax.trie): only allowed sequences are
  produced.
* A T5 front end: `generate` (encode once, decode with the KV cache),
  `score_sequences` / `score_candidates` (teacher-forced log-likelihoods) and
  `first_step_logits`, all jitted with the module as a static argument.

Beam search follows Hugging Face transformers (5.x, `GenerationMixin.
_beam_search`): 2 * num_beams candidates per step; a candidate ending in eos
among the top num_beams enters a per-example heap of num_beams finished
hypotheses with score sum_logprob / generated_len ** length_penalty; the
early-stopping heuristic (`early_stopping` False, True or "never") decides
when an example can no longer improve. Scores of masked tokens are not
renormalised (like HF's `prefix_allowed_tokens_fn`).
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from recjax import trie as trie_lib
from recjax.trie import Trie

PyTree = Any
TokensToLogits = Callable[[jax.Array, PyTree, jax.Array],
                          tuple[jax.Array, PyTree]]

# Bookkeeping penalty used by HF beam search (kept for identical orderings).
BIG_NEG = -1.0e9


def _allowed_tokens(vocab_size: int, step: jax.Array, nodes: jax.Array | None,
                    trie: Trie | None, eos_id: int,
                    min_len: int | jax.Array) -> jax.Array | None:
  """bool[N, V] mask of allowed next tokens, or None when all are allowed.

  With a trie, a hypothesis whose only way on is eos (a title shorter than
  `min_len`) may still end: the trie outranks the minimum length, so the
  output is always an allowed sequence.
  """
  mask = None
  if trie is not None:
    mask = trie_lib.allowed_mask(trie, nodes, vocab_size)
  if not isinstance(min_len, int) or min_len > 0:  # traced, or a real minimum
    no_eos = (jnp.arange(vocab_size) != eos_id) | (step >= min_len)
    if mask is None:
      mask = no_eos[None, :]
    else:
      banned = mask & no_eos[None, :]
      mask = jnp.where(jnp.any(banned, axis=-1, keepdims=True), banned, mask)
  return mask


def _map_batch(fn: Callable[[jax.Array], jax.Array], cache: PyTree) -> PyTree:
  """Applies `fn` to every cache leaf with a batch axis (ndim >= 1)."""
  return jax.tree.map(lambda x: fn(x) if x.ndim >= 1 else x, cache)


# ----------------------------------------------------------------------------
# Greedy search and sampling.
# ----------------------------------------------------------------------------


def _sequential_decode(tokens_to_logits: TokensToLogits, cache: PyTree, *,
                       choose: Callable[[jax.Array, jax.Array], jax.Array],
                       rng: jax.Array, batch_size: int, max_decode_len: int,
                       start_id: int, eos_id: int, pad_id: int,
                       min_len: int | jax.Array,
                       trie: Trie | None) -> tuple[jax.Array, jax.Array]:
  """One token per step chosen by `choose(masked_logits, rng) -> int32[B]`."""
  b, length = batch_size, max_decode_len

  def cond(state):
    step, _, _, done, _, _, _ = state
    return (step < length) & ~jnp.all(done)

  def body(state):
    step, tokens, last, done, score, nodes, cache = state
    logits, cache = tokens_to_logits(last[:, None], cache, step)
    logits = logits.astype(jnp.float32)
    allowed = _allowed_tokens(logits.shape[-1], step, nodes, trie, eos_id,
                              min_len)
    masked = logits if allowed is None else jnp.where(allowed, logits,
                                                      -jnp.inf)
    tok = choose(masked, jax.random.fold_in(rng, step)).astype(jnp.int32)
    tok = jnp.where(done, pad_id, tok)
    logp = jax.nn.log_softmax(logits)
    tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    score = score + jnp.where(done, 0.0, tok_logp)
    tokens = tokens.at[:, step].set(tok)
    if trie is not None:
      nodes = trie_lib.next_nodes(trie, nodes, tok)
    done = done | (tok == eos_id)
    return step + 1, tokens, tok, done, score, nodes, cache

  state = (jnp.array(0, jnp.int32), jnp.full((b, length), pad_id, jnp.int32),
           jnp.full((b,), start_id, jnp.int32), jnp.zeros((b,), jnp.bool_),
           jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32), cache)
  _, tokens, _, _, score, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens, score


def greedy_search(tokens_to_logits: TokensToLogits, cache: PyTree, *,
                  batch_size: int, max_decode_len: int, start_id: int = 0,
                  eos_id: int = 1, pad_id: int = 0,
                  min_len: int | jax.Array = 0,
                  trie: Trie | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding (HF `num_beams=1, do_sample=False`).

  Args:
    tokens_to_logits: step function (module docstring).
    cache: decoder state for `batch_size` rows.
    batch_size: B.
    max_decode_len: L, number of generated tokens (start token excluded).
    start_id: decoder start token fed at step 0.
    eos_id: end of sequence; a row stops after it and is padded.
    pad_id: written after eos.
    min_len: eos is forbidden for the first `min_len` steps.
    trie: if given, only sequences of the trie are produced.

  Returns:
    tokens int32[B, L] and scores float32[B], the summed model log-probs of
    the generated tokens up to and including eos.
  """
  choose = lambda logits, rng: jnp.argmax(logits, axis=-1)
  return _sequential_decode(
      tokens_to_logits, cache, choose=choose, rng=jax.random.key(0),
      batch_size=batch_size, max_decode_len=max_decode_len,
      start_id=start_id, eos_id=eos_id, pad_id=pad_id, min_len=min_len,
      trie=trie)


def temperature_sample(tokens_to_logits: TokensToLogits, cache: PyTree,
                       rng: jax.Array, *, batch_size: int,
                       max_decode_len: int,
                       temperature: float | jax.Array = 1.0, top_k: int = 0,
                       start_id: int = 0, eos_id: int = 1, pad_id: int = 0,
                       min_len: int | jax.Array = 0, trie: Trie | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Ancestral sampling from softmax(logits / temperature), optionally top-k.

  The trie mask is applied first, then temperature, then top-k (ties at the
  k-th value are kept, like HF). Step t uses `fold_in(rng, t)`. Arguments and
  returns as `greedy_search`; scores are untempered model log-probs.
  """
  def choose(logits, key):
    logits = logits / temperature
    if top_k > 0:
      kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)

  return _sequential_decode(
      tokens_to_logits, cache, choose=choose, rng=rng, batch_size=batch_size,
      max_decode_len=max_decode_len, start_id=start_id, eos_id=eos_id,
      pad_id=pad_id, min_len=min_len, trie=trie)


# ----------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------


class _BeamState(NamedTuple):
  """Loop carry of `beam_search` (B examples, K beams, L steps)."""
  step: jax.Array  # int32[], tokens generated so far.
  run_seqs: jax.Array  # int32[B, K, L] running hypotheses.
  run_scores: jax.Array  # float32[B, K] their summed log-probs.
  last: jax.Array  # int32[B, K] their last tokens.
  nodes: jax.Array  # int32[B, K] their trie nodes (unused without trie).
  fin_seqs: jax.Array  # int32[B, K, L] finished heap, best first.
  fin_scores: jax.Array  # float32[B, K] length-penalised scores.
  fin_flags: jax.Array  # bool[B, K] heap slot holds a hypothesis.
  improvable: jax.Array  # bool[B] HF's (sticky) early-stopping flag.
  cache: PyTree  # B * K rows.


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[b, idx[b, j], ...] for x [B, M, ...] and idx int32[B, J]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def beam_search(tokens_to_logits: TokensToLogits, cache: PyTree, *,
                batch_size: int, num_beams: int, max_decode_len: int,
                length_penalty: float | jax.Array = 1.0,
                early_stopping: bool | str = False, start_id: int = 0,
                eos_id: int = 1, pad_id: int = 0, min_len: int | jax.Array = 0,
                trie: Trie | None = None) -> tuple[jax.Array, jax.Array]:
  """Beam search with HF's finished-hypotheses heap and length penalty.

  Args:
    tokens_to_logits: step function called on B * num_beams rows (row
      b * num_beams + k is beam k of example b).
    cache: decoder state for `batch_size` rows; leaves with ndim >= 1 are
      repeated num_beams times along axis 0 and reordered by `x[idx]`.
    batch_size: B.
    num_beams: K.
    max_decode_len: L, generated tokens (start token excluded).
    length_penalty: finished score = sum logprob / len ** length_penalty,
      len counting the generated tokens including eos.
    early_stopping: HF semantics: False (default heuristic), True (stop an
      example once it has K finished hypotheses) or "never".
    start_id, eos_id, pad_id, min_len, trie: as in `greedy_search`.

  Returns:
    tokens int32[B, K, L], best first, padded after eos, and scores
    float32[B, K] (length-penalised). A slot that never received a finished
    hypothesis has a score <= -1e9 (only possible with a small trie).
  """
  b, k, length = batch_size, num_beams, max_decode_len
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got "
                     f"{early_stopping!r}")
  num_cand = 2 * k  # HF keeps (1 + number of eos ids) * num_beams candidates.
  top_beam_mask = jnp.arange(num_cand) < k
  cache = _map_batch(lambda x: jnp.repeat(x, k, axis=0), cache)

  def cond(state: _BeamState) -> jax.Array:
    go = (state.step < length) & jnp.any(state.improvable)
    if early_stopping is True:
      go &= ~jnp.all(state.fin_flags)
    return go

  def body(state: _BeamState) -> _BeamState:
    (step, run_seqs, run_scores, last, nodes, fin_seqs, fin_scores,
     fin_flags, improvable, cache) = state
    logits, cache = tokens_to_logits(last.reshape(b * k, 1), cache, step)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    vocab = logp.shape[-1]
    allowed = _allowed_tokens(vocab, step, nodes.reshape(-1), trie, eos_id,
                              min_len)
    if allowed is not None:
      logp = jnp.where(allowed, logp, -jnp.inf)
    cand = logp.reshape(b, k, vocab) + run_scores[:, :, None]
    top_scores, top_idx = jax.lax.top_k(cand.reshape(b, k * vocab), num_cand)
    parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _gather(run_seqs, parent).at[:, :, step].set(tok)
    hits = (tok == eos_id) | (step + 1 >= length)  # [B, 2K]

    # Running beams: the best K candidates that did not stop.
    run_scores, sel = jax.lax.top_k(top_scores + hits * BIG_NEG, k)
    run_seqs = _gather(top_seqs, sel)
    run_parent = _gather(parent, sel)
    last = _gather(tok, sel)
    flat_parent = (jnp.arange(b)[:, None] * k + run_parent).reshape(-1)
    cache = _map_batch(lambda x: x[flat_parent], cache)
    if trie is not None:
      nodes = trie_lib.next_nodes(trie, _gather(nodes, run_parent).reshape(-1),
                                  last.reshape(-1)).reshape(b, k)

    # Finished heap: stopped candidates among the top K enter if they beat
    # the current members.
    just_finished = hits & top_beam_mask[None, :]
    gen_len = (step + 1).astype(jnp.float32)
    cand_fin = top_scores / gen_len ** length_penalty
    if early_stopping is True:
      cand_fin += jnp.all(fin_flags, axis=1, keepdims=True) * BIG_NEG
    cand_fin += ~improvable[:, None] * BIG_NEG
    cand_fin += ~just_finished * BIG_NEG
    merged = jnp.concatenate([fin_scores, cand_fin], axis=1)
    fin_scores, sel = jax.lax.top_k(merged, k)
    fin_seqs = _gather(jnp.concatenate([fin_seqs, top_seqs], axis=1), sel)
    fin_flags = _gather(jnp.concatenate([fin_flags, just_finished], axis=1),
                        sel)

    # Can the best running beam still beat the worst finished hypothesis?
    best_len = gen_len
    if early_stopping == "never":  # HF: assume the longest length if it helps.
      best_len = jnp.where(length_penalty > 0.0, jnp.float32(length), gen_len)
    best_running = run_scores[:, :1] / best_len ** length_penalty
    worst = jnp.where(fin_flags, jnp.min(fin_scores, axis=1, keepdims=True),
                      BIG_NEG)
    improvable &= jnp.any(best_running > worst, axis=1)
    return _BeamState(step + 1, run_seqs, run_scores, last, nodes, fin_seqs,
                      fin_scores, fin_flags, improvable, cache)

  seqs = jnp.full((b, k, length), pad_id, jnp.int32)
  state = _BeamState(
      step=jnp.array(0, jnp.int32), run_seqs=seqs,
      # Only beam 0 is live at first, so the K beams do not start identical.
      run_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(BIG_NEG),
      last=jnp.full((b, k), start_id, jnp.int32),
      nodes=jnp.full((b, k), trie_lib.ROOT, jnp.int32), fin_seqs=seqs,
      fin_scores=jnp.full((b, k), BIG_NEG, jnp.float32),
      fin_flags=jnp.zeros((b, k), jnp.bool_),
      improvable=jnp.ones((b,), jnp.bool_), cache=cache)
  state = jax.lax.while_loop(cond, body, state)
  return state.fin_seqs, state.fin_scores


# ----------------------------------------------------------------------------
# T5 front end.
# ----------------------------------------------------------------------------


def _special_ids(module) -> tuple[int, int, int]:
  """(decoder start, eos, pad) ids from the module's config (T5 defaults)."""
  config = getattr(module, "config", None)
  start = getattr(config, "decoder_start_token_id", 0)
  eos = getattr(config, "eos_token_id", 1)
  pad = getattr(config, "pad_token_id", 0)
  return int(start), int(eos), int(pad)


def _encode(module, params: PyTree, input_ids: jax.Array | None,
            attention_mask: jax.Array | None,
            prefix_embeds: jax.Array | None,
            inputs_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs the encoder once.

  Returns:
    encoded float[B, P + S, D] and the encoder mask int32[B, P + S], with P
    soft-prompt positions (always attended) when `prefix_embeds` float[B, P,
    D] is given, else P = 0. With `inputs_embeds` float[B, S, D] the encoder
    reads those vectors instead of embedding `input_ids` (then ignored).
  """
  if inputs_embeds is not None:
    if prefix_embeds is not None:
      raise ValueError("pass the soft prompts inside inputs_embeds, not as prefix_embeds")
    mask = (jnp.ones(inputs_embeds.shape[:2], jnp.int32) if attention_mask is None
            else attention_mask.astype(jnp.int32))
    encoded = module.apply({"params": params}, inputs_embeds, mask,
                           method="encode_embeds")
    return encoded, mask
  if input_ids is None:
    raise ValueError("generate needs input_ids or inputs_embeds")
  mask = (jnp.ones_like(input_ids, jnp.int32) if attention_mask is None
          else attention_mask.astype(jnp.int32))
  kwargs = {} if prefix_embeds is None else {"prefix_embeds": prefix_embeds}
  encoded = module.apply({"params": params}, input_ids, mask,
                         method="encode", **kwargs)
  if prefix_embeds is not None:
    ones = jnp.ones((mask.shape[0], prefix_embeds.shape[1]), jnp.int32)
    mask = jnp.concatenate([ones, mask], axis=1)
  return encoded, mask


def _t5_step_fn(module, params: PyTree, encoded: jax.Array,
                encoder_mask: jax.Array) -> TokensToLogits:
  """Wraps one cached T5 decoder step as a `tokens_to_logits` function."""
  def tokens_to_logits(token_ids, cache, step):
    del step  # The cache keeps its own index.
    logits, mutated = module.apply(
        {"params": params, "cache": cache}, encoded, encoder_mask, token_ids,
        decode=True, method="decode", mutable=["cache"])
    return logits[:, -1, :].astype(jnp.float32), mutated["cache"]
  return tokens_to_logits


@functools.partial(
    jax.jit, static_argnames=(
        "module", "max_decode_len", "method", "num_beams", "early_stopping",
        "top_k", "return_all_beams"))
def generate(module, params: PyTree, input_ids: jax.Array | None,
             attention_mask: jax.Array | None = None, *, max_decode_len: int,
             method: str = "greedy", num_beams: int = 4,
             length_penalty: float | jax.Array = 1.0,
             early_stopping: bool | str = False,
             temperature: float | jax.Array = 1.0, top_k: int = 0,
             rng: jax.Array | None = None, trie: Trie | None = None,
             min_len: int | jax.Array = 0, return_all_beams: bool = False,
             prefix_embeds: jax.Array | None = None,
             inputs_embeds: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Generates from a T5 module: encodes once, decodes with the KV cache.

  Args:
    module: a `recjax.models.t5.T5` (static: hashable linen module).
    params: its parameters (`scan_layers=False` layout).
    input_ids: int32[B, S] encoder tokens (None with `inputs_embeds`).
    attention_mask: int32[B, S] (1 = token); None means all ones.
    max_decode_len: L generated tokens (the decoder start token excluded).
    method: "greedy", "beam" or "sample".
    num_beams, length_penalty, early_stopping: beam search (`beam_search`).
    temperature, top_k, rng: sampling (`temperature_sample`); rng required.
    trie: constrain outputs to the trie's sequences (all methods); needs
      max_decode_len >= trie.max_len.
    min_len: forbid eos for the first min_len steps.
    return_all_beams: for "beam", return all K beams ([B, K, L], [B, K]).
    prefix_embeds: optional float[B, P, D] soft prompt put before the
      embedded input tokens (see `T5.encode`).
    inputs_embeds: optional float[B, S, D] encoder input vectors used instead
      of embedding `input_ids` (the joint model's prompts: soft prompts, item
      tokens and text; `recjax.models.joint.JointModel.prompt_embeds`).

  Returns:
    tokens int32[B, L] (pad after eos) and scores float32[B]: summed
    log-probs for greedy/sample, HF's length-penalised beam score for beam.
  """
  from recjax.models import t5  # pylint: disable=g-import-not-at-top

  if method not in ("greedy", "beam", "sample"):
    raise ValueError(f"Unknown decoding method {method!r}.")
  if method == "sample" and rng is None:
    raise ValueError("method='sample' needs rng.")
  if trie is not None and max_decode_len < trie.max_len:
    raise ValueError(f"max_decode_len={max_decode_len} is shorter than the "
                     f"longest trie sequence ({trie.max_len}).")
  start_id, eos_id, pad_id = _special_ids(module)
  encoded, enc_mask = _encode(module, params, input_ids, attention_mask,
                              prefix_embeds, inputs_embeds)
  batch, enc_len = enc_mask.shape
  # B rows; beam_search repeats them for its B * K hypotheses.
  cache = t5.init_cache(module, batch, max_decode_len, enc_len)
  common = dict(batch_size=batch, max_decode_len=max_decode_len,
                start_id=start_id, eos_id=eos_id, pad_id=pad_id,
                min_len=min_len, trie=trie)
  if method == "beam":
    step_fn = _t5_step_fn(module, params,
                          jnp.repeat(encoded, num_beams, axis=0),
                          jnp.repeat(enc_mask, num_beams, axis=0))
    tokens, scores = beam_search(
        step_fn, cache, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, **common)
    if not return_all_beams:
      tokens, scores = tokens[:, 0], scores[:, 0]
    return tokens, scores
  step_fn = _t5_step_fn(module, params, encoded, enc_mask)
  if method == "greedy":
    return greedy_search(step_fn, cache, **common)
  return temperature_sample(step_fn, cache, rng, temperature=temperature,
                            top_k=top_k, **common)


def _shift_right(target_ids: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing: start token, then targets[:-1]."""
  start = jnp.full(target_ids.shape[:-1] + (1,), start_id, target_ids.dtype)
  return jnp.concatenate([start, target_ids[..., :-1]], axis=-1)


def _target_log_likelihood(module, params: PyTree, encoded: jax.Array,
                           encoder_mask: jax.Array, target_ids: jax.Array,
                           target_mask: jax.Array) -> jax.Array:
  """float32[N] summed log p(target_t | target_<t) over masked positions."""
  start_id, _, _ = _special_ids(module)
  logits = module.apply(
      {"params": params}, encoded, encoder_mask,
      _shift_right(target_ids, start_id), method="decode")
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
  token_logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(token_logp * target_mask.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("module",))
def score_sequences(module, params: PyTree, input_ids: jax.Array,
                    attention_mask: jax.Array | None, target_ids: jax.Array,
                    target_mask: jax.Array, *,
                    prefix_embeds: jax.Array | None = None) -> jax.Array:
  """Teacher-forced log-likelihood of given targets.

  Args:
    module, params: the T5 module and its parameters.
    input_ids: int32[B, S]; attention_mask: int32[B, S] or None (all ones).
    target_ids: int32[B, T] targets (eos included where it should count).
    target_mask: [B, T] 1 where a target token counts.
    prefix_embeds: optional float[B, P, D] soft prompt (as `generate`).

  Returns:
    float32[B], sum over masked t of log p(target_t | inputs, target_<t).
  """
  encoded, enc_mask = _encode(module, params, input_ids, attention_mask,
                              prefix_embeds)
  return _target_log_likelihood(module, params, encoded, enc_mask, target_ids,
                                target_mask)


@functools.partial(jax.jit, static_argnames=("module", "chunk_size"))
def score_candidates(module, params: PyTree, input_ids: jax.Array,
                     attention_mask: jax.Array | None,
                     candidate_ids: jax.Array, candidate_mask: jax.Array, *,
                     chunk_size: int | None = None,
                     prefix_embeds: jax.Array | None = None) -> jax.Array:
  """Scores C candidate targets per example, encoding each input once.

  Args:
    module, params: the T5 module and its parameters.
    input_ids: int32[B, S]; attention_mask: int32[B, S] or None.
    candidate_ids: int32[B, C, T] candidate targets (e.g. titles + eos).
    candidate_mask: [B, C, T] 1 where a token counts.
    chunk_size: decode this many candidates per example at once (bounds the
      float32[B * chunk, T, V] logits); None decodes all C together.
    prefix_embeds: optional float[B, P, D] soft prompt (as `generate`).

  Returns:
    float32[B, C] log-likelihood of each candidate.
  """
  encoded, enc_mask = _encode(module, params, input_ids, attention_mask,
                              prefix_embeds)
  b, c, t = candidate_ids.shape
  chunk = c if chunk_size is None else min(chunk_size, c)
  num_chunks = -(-c // chunk)
  pad = ((0, 0), (0, num_chunks * chunk - c), (0, 0))

  def to_chunks(x):  # [B, C, T] -> [num_chunks, B * chunk, T]
    x = jnp.pad(x, pad).reshape(b, num_chunks, chunk, t).swapaxes(0, 1)
    return x.reshape(num_chunks, b * chunk, t)

  # Row b * chunk + j of a chunk is its candidate j of example b.
  enc = jnp.repeat(encoded, chunk, axis=0)
  enc_mask = jnp.repeat(enc_mask, chunk, axis=0)
  scores = jax.lax.map(
      lambda args: _target_log_likelihood(module, params, enc, enc_mask,
                                          *args),
      (to_chunks(candidate_ids), to_chunks(candidate_mask)))
  scores = scores.reshape(num_chunks, b, chunk).swapaxes(0, 1)
  return scores.reshape(b, num_chunks * chunk)[:, :c]


@functools.partial(jax.jit, static_argnames=("module",))
def first_step_logits(module, params: PyTree, input_ids: jax.Array,
                      attention_mask: jax.Array | None,
                      token_subset: jax.Array, *,
                      prefix_embeds: jax.Array | None = None) -> jax.Array:
  """Logits of the first decoded token restricted to a subset (e.g. yes/no).

  Args:
    module, params: the T5 module and its parameters.
    input_ids: int32[B, S]; attention_mask: int32[B, S] or None.
    token_subset: int32[K] token ids.
    prefix_embeds: optional float[B, P, D] soft prompt (as `generate`).

  Returns:
    float32[B, K] raw (unnormalised) logits after the decoder start token.
  """
  start_id, _, _ = _special_ids(module)
  encoded, enc_mask = _encode(module, params, input_ids, attention_mask,
                              prefix_embeds)
  start = jnp.full((input_ids.shape[0], 1), start_id, jnp.int32)
  logits = module.apply({"params": params}, encoded, enc_mask, start,
                        method="decode")
  return logits[:, 0, :].astype(jnp.float32)[:, token_subset]
