"""A prefix trie over token sequences, stored as dense arrays usable inside jit.

Constrained decoding keeps every hypothesis on a path of the trie, so that each
finished output is one of the allowed sequences (e.g. tokenized item titles,
each ending with eos).

Memory: a dense `[num_nodes, vocab]` transition table is out of the question
for a 32k vocabulary, so the trie is a CSR edge list:

  offsets   int32[num_nodes + 1]  edges of node n are offsets[n]:offsets[n + 1]
  tokens    int32[num_edges]      edge labels, sorted within each node
  children  int32[num_edges]      node reached through each edge

Per decode step, `allowed_mask` gathers at most `max_degree` edges per
hypothesis and scatters them into a `bool[N, V]` mask (the size of the logits,
which exist anyway), and `next_nodes` follows an edge by a fixed-length binary
search within the node's sorted edges. Node 0 is the root; -1 is a dead state
(a hypothesis that left the trie) with no allowed tokens.
"""

from collections.abc import Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

ROOT = 0
DEAD = -1


@struct.dataclass
class Trie:
  """Prefix trie as a CSR edge list (see module docstring).

  Attributes:
    offsets: int32[num_nodes + 1] CSR row pointers.
    tokens: int32[num_edges] edge labels, sorted ascending within each node.
    children: int32[num_edges] child node of each edge.
    max_degree: largest number of edges leaving one node (static).
    max_len: length of the longest sequence, eos included (static): decoding
      needs at least this many steps to finish every sequence.
    num_sequences: number of distinct sequences stored (static).
  """
  offsets: jax.Array
  tokens: jax.Array
  children: jax.Array
  max_degree: int = struct.field(pytree_node=False)
  max_len: int = struct.field(pytree_node=False)
  num_sequences: int = struct.field(pytree_node=False)

  @property
  def num_nodes(self) -> int:
    return self.offsets.shape[0] - 1


def build_trie(sequences: Sequence[Sequence[int]], eos_id: int = 1) -> Trie:
  """Builds a trie from token sequences (host-side, numpy).

  Each sequence gets `eos_id` appended unless it already ends with it, so that
  the stored set is prefix-free and every path from the root ends in eos.
  Duplicates are stored once.

  Args:
    sequences: token id sequences, e.g. tokenized item titles.
    eos_id: end-of-sequence token id.

  Returns:
    A `Trie` of device arrays.
  """
  if not sequences:
    raise ValueError("build_trie needs at least one sequence.")
  edges: list[dict[int, int]] = [{}]  # node -> {token: child}
  distinct = set()
  max_len = 0
  for seq in sequences:
    seq = [int(t) for t in seq]
    if not seq or seq[-1] != eos_id:
      seq.append(eos_id)
    if eos_id in seq[:-1]:
      raise ValueError(f"eos {eos_id} inside a sequence: {seq}")
    distinct.add(tuple(seq))
    max_len = max(max_len, len(seq))
    node = ROOT
    for t in seq:
      child = edges[node].get(t)
      if child is None:
        child = len(edges)
        edges[node][t] = child
        edges.append({})
      node = child
  degrees = np.array([len(e) for e in edges], np.int64)
  offsets = np.zeros(len(edges) + 1, np.int64)
  np.cumsum(degrees, out=offsets[1:])
  tokens = np.empty(int(offsets[-1]), np.int32)
  children = np.empty(int(offsets[-1]), np.int32)
  for n, e in enumerate(edges):
    items = sorted(e.items())
    tokens[offsets[n]:offsets[n + 1]] = [t for t, _ in items]
    children[offsets[n]:offsets[n + 1]] = [c for _, c in items]
  return Trie(
      offsets=jnp.asarray(offsets, jnp.int32), tokens=jnp.asarray(tokens),
      children=jnp.asarray(children),
      max_degree=int(degrees.max()), max_len=max_len,
      num_sequences=len(distinct))


def _edge_range(trie: Trie, nodes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last edge of each node; empty for DEAD nodes."""
  safe = jnp.maximum(nodes, 0)
  start = trie.offsets[safe]
  end = jnp.where(nodes >= 0, trie.offsets[safe + 1], start)
  return start, end


def allowed_mask(trie: Trie, nodes: jax.Array, vocab_size: int) -> jax.Array:
  """Tokens that keep each hypothesis inside the trie.

  Args:
    trie: the trie.
    nodes: int32[N] current node of each hypothesis (DEAD allowed).
    vocab_size: V.

  Returns:
    bool[N, V], True where the token is an edge out of the node.
  """
  start, end = _edge_range(trie, nodes)
  slot = jnp.arange(trie.max_degree, dtype=jnp.int32)
  edge = start[:, None] + slot[None, :]  # [N, D]
  valid = edge < end[:, None]
  num_edges = trie.tokens.shape[0]
  tok = trie.tokens[jnp.clip(edge, 0, num_edges - 1)]
  tok = jnp.where(valid, tok, vocab_size)  # out of range: dropped below
  rows = jnp.arange(nodes.shape[0], dtype=jnp.int32)[:, None]
  mask = jnp.zeros((nodes.shape[0], vocab_size), jnp.bool_)
  return mask.at[rows, tok].set(True, mode="drop")


def next_nodes(trie: Trie, nodes: jax.Array, token_ids: jax.Array) -> jax.Array:
  """Follows one edge per hypothesis.

  Args:
    trie: the trie.
    nodes: int32[N] current nodes (DEAD allowed).
    token_ids: int32[N] tokens taken.

  Returns:
    int32[N] child nodes, DEAD where the token is not an edge of the node.
  """
  start, end = _edge_range(trie, nodes)
  num_edges = trie.tokens.shape[0]
  lo, hi = start, end
  # Lower bound of token_ids in tokens[start:end]; the range halves each time.
  for _ in range(max(1, int(trie.max_degree).bit_length())):
    mid = (lo + hi) // 2
    active = lo < hi
    less = trie.tokens[jnp.clip(mid, 0, num_edges - 1)] < token_ids
    lo = jnp.where(active & less, mid + 1, lo)
    hi = jnp.where(active & ~less, mid, hi)
  found = (lo < end) & (trie.tokens[jnp.clip(lo, 0, num_edges - 1)]
                        == token_ids)
  child = trie.children[jnp.clip(lo, 0, num_edges - 1)]
  return jnp.where(found, child, DEAD).astype(jnp.int32)


def trie_sequences(trie: Trie) -> list[tuple[int, ...]]:
  """All stored sequences (host-side, for tests and debugging)."""
  offsets = np.asarray(trie.offsets)
  tokens = np.asarray(trie.tokens)
  children = np.asarray(trie.children)
  out, stack = [], [(ROOT, ())]
  while stack:
    node, prefix = stack.pop()
    if offsets[node] == offsets[node + 1]:
      out.append(prefix)
    for e in range(offsets[node], offsets[node + 1]):
      stack.append((int(children[e]), prefix + (int(tokens[e]),)))
  return sorted(out)
