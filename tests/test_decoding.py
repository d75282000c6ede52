"""Tests for recjax.decoding and recjax.trie.

Part 1 checks the algorithms on a toy second-order Markov model (the next
token's logits depend on the last two tokens, the older one kept in the
cache, so beam search must reorder its cache) against brute force.
Part 2 compares the T5 front end with Hugging Face's PyTorch T5 on a tiny
random model.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax import decoding
from recjax import trie as trie_lib

EOS = 1
PAD = 0
START = 0

# ----------------------------------------------------------------------------
# Toy model.
# ----------------------------------------------------------------------------


def _toy(vocab, seed, scale=2.0, eos_bias=0.0):
  """Logits table float32[V, V, V]: logits(next | prev, last)."""
  table = np.random.default_rng(seed).normal(size=(vocab, vocab, vocab))
  table = (scale * table).astype(np.float32)
  table[:, :, EOS] += eos_bias
  return table


def _toy_fn(tables):
  """Step function over tables float32[R, V, V, V]: row b of the batch uses
  model b % R (kept in the cache, so beams must carry it along)."""
  tables = jnp.asarray(tables)

  def tokens_to_logits(token_ids, cache, step):
    del step
    last = token_ids[:, 0]
    logits = tables[cache["model"], cache["prev"], last]
    return logits, dict(cache, prev=last, index=cache["index"] + 1)
  return tokens_to_logits


def _toy_cache(batch, num_models=1):
  return {"model": jnp.arange(batch, dtype=jnp.int32) % num_models,
          "prev": jnp.full((batch,), START, jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


_ALGOS = {"greedy": decoding.greedy_search, "beam": decoding.beam_search,
          "sample": decoding.temperature_sample}


# Numeric options traced per algorithm (with their defaults).
_DYNAMIC = {"greedy": dict(min_len=0),
            "beam": dict(min_len=0, length_penalty=1.0),
            "sample": dict(min_len=0, temperature=1.0)}


@functools.partial(jax.jit, static_argnames=("algo", "batch", "opts"))
def _jit_decode(table, trie, rng, dynamic, *, algo, batch, opts):
  extra = () if rng is None else (rng,)
  return _ALGOS[algo](_toy_fn(table), _toy_cache(batch, table.shape[0]),
                      *extra,
                      batch_size=batch, trie=trie, **dynamic, **dict(opts))


def _decode(algo, table, batch, *, trie=None, rng=None, **opts):
  """Runs a decoding algorithm on the toy model (table [V, V, V], or
  [R, V, V, V] for a different model per row). The table and the numeric
  options are traced, so one compilation serves many tests."""
  dynamic = {k: jnp.asarray(opts.pop(k, v)) for k, v in _DYNAMIC[algo].items()}
  table = table[None] if table.ndim == 3 else table
  tokens, scores = _jit_decode(jnp.asarray(table), trie, rng, dynamic,
                               algo=algo, batch=batch,
                               opts=tuple(sorted(opts.items())))
  return np.asarray(tokens), np.asarray(scores)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _seq_logprob(table, seq):
  """Summed log-prob of a token sequence under the toy model."""
  prev, last, total = START, START, 0.0
  for tok in seq:
    total += _log_softmax(table[prev, last].astype(np.float64))[tok]
    prev, last = last, tok
  return total


def _all_sequences(vocab, length):
  """Every finished hypothesis: ends in eos at position <= L, or has L tokens
  without eos (HF counts those as finished at max length)."""
  out = []
  for n in range(1, length + 1):
    for body in itertools.product(range(vocab), repeat=n - 1):
      if EOS in body:
        continue
      out.append(body + (EOS,))
      if n == length:
        out.extend(body + (t,) for t in range(vocab) if t != EOS)
  return out


def _strip(row):
  """Tokens up to and including the first eos."""
  row = [int(t) for t in row]
  return tuple(row[:row.index(EOS) + 1]) if EOS in row else tuple(row)


def _python_greedy(table, length, min_len=0, trie_seqs=None):
  prev, last, out, score = START, START, [], 0.0
  for step in range(length):
    logits = table[prev, last].astype(np.float64)
    logp = _log_softmax(logits)
    masked = logits.copy()
    if step < min_len:
      masked[EOS] = -np.inf
    if trie_seqs is not None:
      allowed = {s[step] for s in trie_seqs if s[:step] == tuple(out)}
      masked[[t for t in range(len(logits)) if t not in allowed]] = -np.inf
    tok = int(np.argmax(masked))
    out.append(tok)
    score += logp[tok]
    prev, last = last, tok
    if tok == EOS:
      break
  return tuple(out), score


def _titles(vocab, num, seed, max_body=4):
  rng = np.random.default_rng(seed)
  seqs = set()
  while len(seqs) < num:
    n = rng.integers(1, max_body + 1)
    seqs.add(tuple(int(t) for t in rng.integers(2, vocab, size=n)) + (EOS,))
  return sorted(seqs)


# ----------------------------------------------------------------------------
# Trie.
# ----------------------------------------------------------------------------


def test_trie_roundtrip_and_masks():
  seqs = [(5, 3, 1), (5, 4), (7,), (5, 3, 1), (2, 9, 8, 1)]
  trie = trie_lib.build_trie(seqs, eos_id=EOS)
  expected = sorted({(5, 3, 1), (5, 4, 1), (7, 1), (2, 9, 8, 1)})
  assert trie_lib.trie_sequences(trie) == expected
  assert trie.max_len == 4 and trie.num_sequences == 4
  assert trie.max_degree == 3  # the root: 2, 5, 7.
  # Walk every sequence with the jitted ops, checking masks at each node.
  vocab = 12
  walk = jax.jit(lambda t, n, tok: (trie_lib.allowed_mask(t, n, vocab),
                                    trie_lib.next_nodes(t, n, tok)))
  for seq in expected:
    node = jnp.zeros((1,), jnp.int32)
    for i, tok in enumerate(seq):
      mask, child = walk(trie, node, jnp.array([tok], jnp.int32))
      want = {s[i] for s in expected if s[:i] == seq[:i]}
      assert set(np.flatnonzero(np.asarray(mask[0]))) == want
      assert int(child[0]) > 0
      node = child
    mask, _ = walk(trie, node, jnp.array([0], jnp.int32))
    assert not np.asarray(mask).any()  # leaf after eos.
  # Off-trie tokens and the dead state.
  mask, child = walk(trie, jnp.array([0, -1], jnp.int32),
                     jnp.array([3, 5], jnp.int32))
  assert np.asarray(child).tolist() == [-1, -1]
  assert not np.asarray(mask[1]).any()


def test_trie_rejects_bad_input():
  with pytest.raises(ValueError):
    trie_lib.build_trie([])
  with pytest.raises(ValueError):
    trie_lib.build_trie([(3, EOS, 4)])


# ----------------------------------------------------------------------------
# Greedy, sampling and beam search on the toy model.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("min_len", [0, 3])
def test_greedy_matches_python(min_len):
  vocab, length = 7, 6
  for seed in range(4):
    table = _toy(vocab, seed, eos_bias=1.5)
    tokens, scores = _decode("greedy", table, 2, max_decode_len=length,
                             min_len=min_len)
    want, want_score = _python_greedy(table, length, min_len=min_len)
    for row, score in zip(tokens, scores):
      assert _strip(row) == want
      assert (row[len(want):] == PAD).all()
      np.testing.assert_allclose(score, want_score, rtol=1e-5, atol=1e-5)


def test_greedy_with_trie_stays_in_trie():
  vocab, length = 9, 6
  titles = _titles(vocab, 12, seed=0)
  trie = trie_lib.build_trie(titles)
  for seed in range(5):
    table = _toy(vocab, seed)
    tokens, _ = _decode("greedy", table, 1, trie=trie, max_decode_len=length)
    got = _strip(tokens[0])
    assert got in titles
    assert got == _python_greedy(table, length, trie_seqs=titles)[0]


@pytest.mark.parametrize("length_penalty,early_stopping",
                         [(0.0, False), (-0.5, False), (1.0, "never"),
                          (2.0, "never")])
def test_beam_search_exact_with_wide_beam(length_penalty, early_stopping):
  """A beam wider than V * (number of live prefixes) is exhaustive search.
  HF's early stopping is exact as well with length_penalty <= 0, or with
  early_stopping="never" (which bounds running beams at max length)."""
  vocab, length, beams = 4, 3, 40
  seqs = _all_sequences(vocab, length)
  for seed in range(3):
    table = _toy(vocab, seed, eos_bias=0.5)
    tokens, scores = _decode("beam", table, 1, num_beams=beams,
                             max_decode_len=length,
                             length_penalty=length_penalty,
                             early_stopping=early_stopping)
    brute = sorted(((_seq_logprob(table, s) / len(s) ** length_penalty, s)
                    for s in seqs), reverse=True)
    got = [_strip(r) for r in tokens[0]]
    assert got[0] == brute[0][1]
    # The finished heap holds the K best hypotheses, best first.
    np.testing.assert_allclose(scores[0], [s for s, _ in brute[:beams]],
                               rtol=1e-5, atol=1e-5)
    assert got == [s for _, s in brute[:beams]]


def _python_beam_search(table, num_beams, length, length_penalty,
                        early_stopping):
  """Reference: HF 5.x beam search for one example, written as plain loops
  (the finished heap is a sorted list; the example stops when it is done)."""
  k = num_beams
  running = [(0.0, ())] + [(-1e9, ())] * (k - 1)  # HF: only beam 0 is live.
  heap, best_len = [], length
  for step in range(length):
    cands = []
    for score, seq in running:
      prev, last = ((START,) * 2 + seq)[-2:]
      logp = _log_softmax(table[prev, last].astype(np.float64))
      cands += [(score + logp[v], seq + (v,)) for v in range(len(logp))]
    top = sorted(cands, key=lambda c: -c[0])[:2 * k]
    stops = [seq[-1] == EOS or step + 1 == length for _, seq in top]
    for rank, ((score, seq), stop) in enumerate(zip(top, stops)):
      if stop and rank < k:
        heap.append((score / (step + 1) ** length_penalty, seq))
    heap = sorted(heap, key=lambda h: -h[0])[:k]
    running = [c for c, stop in zip(top, stops) if not stop][:k]
    if len(heap) == k and running:
      if early_stopping is True:
        break
      best_len = length if (early_stopping == "never" and
                            length_penalty > 0) else step + 1
      if running[0][0] / best_len ** length_penalty <= heap[-1][0]:
        break
  return heap


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_matches_python_reference(early_stopping):
  """Narrow beams over a batch of different models (rows stop at different
  steps and must then stay frozen) against the loop-based reference."""
  vocab, length, beams, rows = 7, 7, 3, 6
  tables = np.stack([_toy(vocab, seed, scale=1.0, eos_bias=1.0)
                     for seed in range(rows)])
  for lp in (0.5, 1.0, 2.5):
    tokens, scores = _decode("beam", tables, rows, num_beams=beams,
                             max_decode_len=length, length_penalty=lp,
                             early_stopping=early_stopping)
    for row in range(rows):
      want = _python_beam_search(tables[row], beams, length, lp,
                                 early_stopping)
      assert [_strip(t) for t in tokens[row]] == [s for _, s in want]
      np.testing.assert_allclose(scores[row], [s for s, _ in want],
                                 rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    decoding.beam_search(_toy_fn(tables), _toy_cache(1), batch_size=1,
                         num_beams=2, max_decode_len=3, early_stopping="x")


def test_beam_search_with_trie_exact_and_valid():
  vocab, length = 9, 6
  titles = _titles(vocab, 10, seed=1)
  trie = trie_lib.build_trie(titles)
  for seed in range(4):
    table = _toy(vocab, seed)
    best = max(titles, key=lambda s, t=table: _seq_logprob(t, s))
    # Exhaustive (beam >= number of titles, no length penalty).
    tokens, scores = _decode("beam", table, 1, trie=trie,
                             num_beams=len(titles), max_decode_len=length,
                             length_penalty=0.0)
    assert _strip(tokens[0, 0]) == best
    np.testing.assert_allclose(scores[0, 0], _seq_logprob(table, best),
                               rtol=1e-5)
    # Narrow beams: every returned hypothesis is a title.
    tokens, scores = _decode("beam", table, 1, trie=trie, num_beams=3,
                             max_decode_len=length, length_penalty=1.0)
    for row, score in zip(tokens[0], scores[0]):
      assert score > -1e8 and _strip(row) in titles


def test_beam_search_tiny_trie_fewer_titles_than_beams():
  """Dead hypotheses (leaving the trie) never surface as real outputs."""
  trie = trie_lib.build_trie([(4, 5), (6,)])
  table = _toy(8, 0)
  tokens, scores = _decode("beam", table, 1, trie=trie, num_beams=4,
                           max_decode_len=4)
  real = [(_strip(r), s) for r, s in zip(tokens[0], scores[0]) if s > -1e8]
  assert sorted(r for r, _ in real) == [(4, 5, EOS), (6, EOS)]
  for seq, score in real:
    np.testing.assert_allclose(score, _seq_logprob(table, seq) / len(seq),
                               rtol=1e-5)


def test_trie_outranks_min_len():
  """A title shorter than min_len still ends with eos (rather than leaving
  the trie): every algorithm returns only titles, and where a longer title
  exists the minimum length still steers towards it."""
  vocab, length = 9, 6
  titles = [(3, EOS), (4, EOS), (4, 5, 6, EOS)]
  trie = trie_lib.build_trie(titles)
  table = _toy(vocab, 0)
  table[START, START, 3] += 20.0  # greedy's first step picks the short title
  runs = {"greedy": _decode("greedy", table, 1, trie=trie, min_len=4,
                            max_decode_len=length)[0][:1],
          "beam": _decode("beam", table, 1, trie=trie, min_len=4, num_beams=2,
                          max_decode_len=length)[0][0],
          "sample": _decode("sample", table, 8, trie=trie, min_len=4,
                            rng=jax.random.key(0), max_decode_len=length)[0]}
  for algo, rows in runs.items():
    for row in rows:
      assert _strip(row) in titles, (algo, row)
  assert _strip(runs["greedy"][0]) == (3, EOS)
  # After 4, the 2-token title (4, EOS) is banned by min_len while (4, 5, ...)
  # goes on: the minimum length still applies where the trie offers a choice.
  table[START, START, 3] -= 40.0
  table[START, 4, EOS] += 20.0
  tokens, _ = _decode("greedy", table, 1, trie=trie, min_len=4,
                      max_decode_len=length)
  assert _strip(tokens[0]) == (4, 5, 6, EOS)


def test_sampling():
  vocab, length = 7, 6  # As test_greedy_matches_python: no new compilation.
  table = _toy(vocab, 0, eos_bias=1.0)
  greedy, _ = _decode("greedy", table, 2, max_decode_len=length)
  key = jax.random.key(0)
  tokens, _ = _decode("sample", table, 2, rng=key, max_decode_len=length,
                      temperature=1e-4)
  np.testing.assert_array_equal(tokens, greedy)
  # First-token frequencies follow softmax(logits / T) restricted to top-k.
  n, temperature, top_k = 6000, 0.7, 3
  opts = dict(max_decode_len=1, temperature=temperature, top_k=top_k)
  tokens, scores = _decode("sample", table, n, rng=key, **opts)
  logits = table[START, START].astype(np.float64) / temperature
  keep = np.argsort(-logits)[:top_k]
  probs = np.zeros(vocab)
  probs[keep] = np.exp(logits[keep] - logits[keep].max())
  probs /= probs.sum()
  freq = np.bincount(tokens[:, 0], minlength=vocab) / n
  np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))
  # Scores are the untempered log-probs of the sampled token.
  logp = _log_softmax(table[START, START].astype(np.float64))
  np.testing.assert_allclose(scores, logp[tokens[:, 0]], rtol=1e-5)
  # Another key gives other samples; a trie constrains samples.
  other, _ = _decode("sample", table, n, rng=jax.random.key(1), **opts)
  assert (other != tokens).any()
  titles = _titles(vocab, 5, seed=2)
  tokens, _ = _decode("sample", table, 64, rng=key, max_decode_len=length,
                      temperature=2.0, trie=trie_lib.build_trie(titles))
  assert {_strip(r) for r in tokens} <= set(titles)


# ----------------------------------------------------------------------------
# T5 front end against Hugging Face's PyTorch T5.
# ----------------------------------------------------------------------------

T5_VOCAB = 64
T5_LEN = 20  # generated tokens in the HF comparisons (the 20 greedy steps).

# The two architectures the T5 front end is checked on, both tiny and random:
# FLAN-T5 style (gated-GELU, untied lm_head; default 32 buckets, so decoder
# distances 16-19 of the 20 steps use the log-spaced buckets) and the original
# T5 (ReLU, tied and d_model**-0.5-scaled head, d_kv * heads != d_model, fewer
# decoder than encoder layers (HF's generate fails with more), 8 buckets up to distance 12).
T5_ARCHS = {
    "gated": dict(d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                  num_decoder_layers=2, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False),
    "relu": dict(d_kv=6, num_heads=4, d_ff=40, num_layers=3,
                 num_decoder_layers=2, feed_forward_proj="relu",
                 tie_word_embeddings=True, relative_attention_num_buckets=8,
                 relative_attention_max_distance=12),
}


@pytest.fixture(scope="module", params=list(T5_ARCHS))
def t5(request, tmp_path_factory):
  """A tiny random T5 (`T5_ARCHS[request.param]`) in both frameworks, the
  same weights, and a batch of padded inputs."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from recjax.convert import load_t5_from_hf  # pylint: disable=g-import-not-at-top

  arch = request.param
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=T5_VOCAB, d_model=32, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
      **T5_ARCHS[arch])
  hf = transformers.T5ForConditionalGeneration(cfg)
  if arch == "gated":
    # Untie the head like FLAN-T5, with logits of a few nats so that beams
    # differ and eos ends some rows early (seed-dependent).
    hf.lm_head.weight = torch.nn.Parameter(0.35 * torch.randn(T5_VOCAB, 32))
  else:
    # A random tied T5 repeats its input token (the residual stream carries
    # the token's embedding, whose dot product with itself dominates the tied
    # head's logits); louder attention outputs give it varied sequences.
    with torch.no_grad():
      for name, weight in hf.decoder.named_parameters():
        if name.endswith(".o.weight"):
          weight.mul_(20.0)
  hf.eval()
  path = str(tmp_path_factory.mktemp(f"tiny_t5_{arch}"))
  hf.save_pretrained(path)
  module, params = load_t5_from_hf(path)
  assert module.config.tie_word_embeddings == (arch == "relu")
  rng = np.random.default_rng(0)
  ids = rng.integers(2, T5_VOCAB, size=(4, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[3, 3:] = 0
  ids[mask == 0] = PAD
  return dict(hf=hf, torch=torch, module=module, arch=arch,
              params=jax.tree.map(jnp.asarray, params), ids=ids, mask=mask)


def _hf_generate(t5, **kwargs):
  torch = t5["torch"]
  with torch.no_grad():
    out = t5["hf"].generate(
        input_ids=torch.tensor(t5["ids"], dtype=torch.long),
        attention_mask=torch.tensor(t5["mask"], dtype=torch.long),
        max_new_tokens=T5_LEN, return_dict_in_generate=True,
        output_scores=True, **kwargs)
  # Drop the decoder start token.
  return out.sequences[:, 1:].numpy(), out


def _generate(t5, **kwargs):
  tokens, scores = decoding.generate(
      t5["module"], t5["params"], jnp.asarray(t5["ids"]),
      jnp.asarray(t5["mask"]), max_decode_len=T5_LEN, **kwargs)
  return np.asarray(tokens), np.asarray(scores)


def _hf_logprobs(t5, targets):
  """float64[B, T, V] log-probs of HF's teacher-forced decoder."""
  torch = t5["torch"]
  dec_in = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1)
  with torch.no_grad():
    logits = t5["hf"](
        input_ids=torch.tensor(t5["ids"], dtype=torch.long),
        attention_mask=torch.tensor(t5["mask"], dtype=torch.long),
        decoder_input_ids=torch.tensor(dec_in, dtype=torch.long)).logits
  return _log_softmax(logits.numpy().astype(np.float64))


def test_t5_greedy_matches_hf(t5):
  # Without a minimum length rows stop at different eos positions; with it,
  # all T5_LEN tokens are compared.
  for min_len in (0, T5_LEN):
    want, _ = _hf_generate(t5, num_beams=1, do_sample=False,
                           min_new_tokens=min_len)
    got, scores = _generate(t5, method="greedy", min_len=min_len)
    assert got.shape == (4, T5_LEN) and got.dtype == np.int32
    for row_got, row_want in zip(got, want):
      assert _strip(row_got) == _strip(row_want)
    if min_len == 0 and t5["arch"] == "gated":  # the tied model ends no row
      assert any(EOS in r for r in got) and any(EOS not in r for r in got)
  assert len(np.unique(got)) >= 8  # varied sequences, not one repeated token
  # Scores are the model log-probs of the generated tokens (no eos here).
  logp = _hf_logprobs(t5, got)
  want_scores = np.take_along_axis(logp, got[..., None], -1)[..., 0].sum(1)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_t5_beam_matches_hf(t5, early_stopping):
  for lp in ((1.0, 0.0, 2.5) if early_stopping is False else (1.0,)):
    want, out = _hf_generate(t5, num_beams=4, num_return_sequences=1,
                             do_sample=False, length_penalty=lp,
                             early_stopping=early_stopping)
    got, scores = _generate(t5, method="beam", num_beams=4, length_penalty=lp,
                            early_stopping=early_stopping)
    for row_got, row_want in zip(got, want):
      assert _strip(row_got) == _strip(row_want), (lp, early_stopping)
    np.testing.assert_allclose(scores, out.sequences_scores.numpy(),
                               rtol=1e-4, atol=1e-4)


def test_t5_cached_decoding_equals_teacher_forcing(t5):
  """Step-by-step logits with the KV cache equal one teacher-forced pass."""
  from recjax.models import t5 as t5_lib  # pylint: disable=g-import-not-at-top
  module, params = t5["module"], t5["params"]
  ids, mask = jnp.asarray(t5["ids"]), jnp.asarray(t5["mask"])
  targets = np.random.default_rng(1).integers(2, T5_VOCAB, (4, 6))
  targets = jnp.asarray(targets, jnp.int32)
  # Jitted (eager linen applies dispatch op by op and take seconds).
  encoded = jax.jit(lambda p: module.apply({"params": p}, ids, mask,
                                           method="encode"))(params)
  dec_in = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), targets[:, :-1]], 1)
  full = jax.jit(lambda p: module.apply({"params": p}, encoded, mask, dec_in,
                                        method="decode"))(params)
  cache = t5_lib.init_cache(module, 4, 6, ids.shape[1])
  step_fn = decoding._t5_step_fn  # pylint: disable=protected-access
  step = jax.jit(lambda p, enc, tok, cache: step_fn(module, p, enc, mask)(
      tok, cache, None))
  for t in range(6):
    logits, cache = step(params, encoded, dec_in[:, t:t + 1], cache)
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)
  # And greedy scores equal teacher-forced score_sequences of its output.
  tokens, scores = _generate(t5, method="greedy")
  tmask = np.cumsum(np.cumsum(tokens == EOS, 1), 1) <= 1
  got = decoding.score_sequences(module, params, ids, mask, tokens, tmask)
  np.testing.assert_allclose(got, scores, rtol=1e-4, atol=1e-4)


def test_t5_score_sequences_and_candidates(t5):
  module, params = t5["module"], t5["params"]
  ids, mask = jnp.asarray(t5["ids"]), jnp.asarray(t5["mask"])
  rng = np.random.default_rng(2)
  # T = T5_LEN like the greedy outputs: score_sequences compiles once.
  cands = rng.integers(2, T5_VOCAB, (4, 5, T5_LEN)).astype(np.int32)
  lengths = rng.integers(1, T5_LEN + 1, (4, 5))
  pos = np.arange(T5_LEN)[None, None]
  cmask = (pos < lengths[..., None]).astype(np.int32)
  cands[pos == (lengths - 1)[..., None]] = EOS
  cands[cmask == 0] = PAD
  # Candidate c of every example against HF's summed log-probs.
  want = np.zeros((4, 5))
  for c in range(5):
    logp = _hf_logprobs(t5, cands[:, c])
    tok = np.take_along_axis(logp, cands[:, c, :, None], -1)[..., 0]
    want[:, c] = (tok * cmask[:, c]).sum(1)
    got = decoding.score_sequences(module, params, ids, mask, cands[:, c],
                                   cmask[:, c])
    np.testing.assert_allclose(got, want[:, c], rtol=1e-4, atol=1e-4)
  # Chunks of 2 candidates: 5 = 2 + 2 + 1 exercises the padding.
  got = decoding.score_candidates(module, params, ids, mask, cands, cmask,
                                  chunk_size=2)
  assert got.shape == (4, 5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_t5_first_step_logits_and_prefix_embeds(t5):
  torch = t5["torch"]
  module, params = t5["module"], t5["params"]
  ids, mask = jnp.asarray(t5["ids"]), jnp.asarray(t5["mask"])
  subset = jnp.array([7, 3, 42], jnp.int32)
  got = decoding.first_step_logits(module, params, ids, mask, subset)
  with torch.no_grad():
    logits = t5["hf"](
        input_ids=torch.tensor(t5["ids"], dtype=torch.long),
        attention_mask=torch.tensor(t5["mask"], dtype=torch.long),
        decoder_input_ids=torch.zeros((4, 1), dtype=torch.long)).logits
  np.testing.assert_allclose(got, logits[:, 0, [7, 3, 42]].numpy(),
                             rtol=1e-4, atol=1e-4)
  # A soft prompt (e.g. item embeddings from the bridge) goes through the
  # encoder in every front-end function, and through the cached decoder.
  d_model = module.config.d_model
  prefix = jnp.asarray(np.random.default_rng(5).normal(size=(4, 2, d_model)),
                       jnp.float32)
  got = decoding.first_step_logits(module, params, ids, mask, subset,
                                   prefix_embeds=prefix)
  want = jax.jit(lambda p: module.apply(
      {"params": p}, ids, jnp.zeros((4, 1), jnp.int32), mask,
      prefix_embeds=prefix))(params)
  np.testing.assert_allclose(got, want[:, 0, subset], rtol=1e-4, atol=1e-4)
  assert np.abs(got - logits[:, 0, [7, 3, 42]].numpy()).max() > 1e-3
  tokens, scores = _generate(t5, method="greedy", prefix_embeds=prefix)
  tmask = np.cumsum(np.cumsum(tokens == EOS, 1), 1) <= 1
  want = decoding.score_sequences(module, params, ids, mask, tokens, tmask,
                                  prefix_embeds=prefix)
  np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


def test_t5_constrained_decoding(t5):
  titles = _titles(T5_VOCAB, 15, seed=3, max_body=5)
  trie = trie_lib.build_trie(titles)

  def allowed_fn(batch_id, sent):
    del batch_id
    prefix = tuple(int(t) for t in sent[1:])
    nxt = {s[len(prefix)] for s in titles
           if len(s) > len(prefix) and s[:len(prefix)] == prefix}
    return sorted(nxt) or [PAD]  # Off-trie beams (score -inf) stay dead.

  greedy, _ = _generate(t5, method="greedy", trie=trie)
  beams, scores = _generate(t5, method="beam", trie=trie, num_beams=4,
                            return_all_beams=True)
  assert beams.shape == (4, 4, T5_LEN)
  for got, hf_kwargs in ((greedy, dict(num_beams=1)),
                         (beams[:, 0], dict(num_beams=4))):
    want, _ = _hf_generate(t5, do_sample=False,
                           prefix_allowed_tokens_fn=allowed_fn, **hf_kwargs)
    for row_got, row_want in zip(got, want):
      assert _strip(row_got) in titles
      assert _strip(row_got) == _strip(row_want), hf_kwargs
  for row, score in zip(beams.reshape(-1, T5_LEN), scores.reshape(-1)):
    assert score > -1e8 and _strip(row) in titles
  with pytest.raises(ValueError):
    decoding.generate(t5["module"], t5["params"], jnp.asarray(t5["ids"]),
                      jnp.asarray(t5["mask"]), max_decode_len=3, trie=trie)


def test_t5_sampling(t5):
  greedy, _ = _generate(t5, method="greedy")
  got, _ = _generate(t5, method="sample", temperature=1e-4,
                     rng=jax.random.key(3))
  np.testing.assert_array_equal(got, greedy)
  a, sa = _generate(t5, method="sample", rng=jax.random.key(0))
  b, _ = _generate(t5, method="sample", rng=jax.random.key(1))
  assert (a != b).any()
  # Sample scores are the model log-probs of the sampled sequences.
  tmask = np.cumsum(np.cumsum(a == EOS, 1), 1) <= 1
  want = decoding.score_sequences(t5["module"], t5["params"],
                                  jnp.asarray(t5["ids"]),
                                  jnp.asarray(t5["mask"]), a, tmask)
  np.testing.assert_allclose(sa, want, rtol=1e-4, atol=1e-4)
