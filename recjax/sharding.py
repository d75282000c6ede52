"""Device mesh, logical axis rules and shardings.

Model code names the axes of every parameter and main activation with *logical*
names (`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`, `items`).
The config maps them onto the three *mesh* axes:

  data    pure data parallelism: the batch is split, parameters replicated;
  fsdp    the batch is split AND parameters / optimizer state are sharded;
  tensor  model (tensor) parallelism: heads, mlp, vocab, items are split.

A rule set is a tuple of `(logical_name, mesh_axes)` pairs, t5x style. Names
without a rule are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis rules. `batch` always goes over the data-like axes.
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Everything replicated but the batch.
    "dp": (("batch", ("data", "fsdp")),),
    # Parameters sharded along their embedding axis over `fsdp`.
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
    ),
    # Megatron-style tensor parallelism plus FSDP on the embedding axis.
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("items", "tensor"),
    ),
}


def get_rules(name_or_rules: str | Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """A rule set by name (see `RULES`) or an explicit list of pairs."""
  if isinstance(name_or_rules, str):
    if name_or_rules not in RULES:
      raise ValueError(
          f"Unknown sharding rules {name_or_rules!r}; known: {sorted(RULES)}")
    return RULES[name_or_rules]
  return tuple((str(k), tuple(v) if isinstance(v, list) else v)
               for k, v in name_or_rules)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 (= the rest).

  Axis types are `Auto`, so linen's logical sharding constraints work (the
  default of `jax.make_mesh` is `Explicit`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries "
                     f"for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in the mesh shape, got {shape}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by {known} "
                       f"(mesh shape {shape})")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"{len(devices)} available")
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules) -> Any:
  """Logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, get_rules(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over the data-like mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_process_rows(mesh: Mesh, global_batch_size: int) -> None:
  """Raises unless this process's devices hold one contiguous block of B/P rows of the
  batch: the input pipeline collates B/P rows for each process (`global_batch`).

  Otherwise `jax.make_array_from_process_local_data` would silently build a batch from
  different rows on processes that share a batch shard (data * fsdp smaller than the
  process count, e.g. tensor parallelism wider than one host).
  """
  p, n = jax.process_index(), jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} not divisible by {n} processes")
  local = global_batch_size // n
  held = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map(
      (global_batch_size,)).values():
    held.update(range(*index[0].indices(global_batch_size)))
  # The process's B/P rows land in the block its devices hold: any contiguous block of
  # B/P rows works (a mesh that orders the processes differently only permutes the batch).
  if len(held) != local or max(held) - min(held) + 1 != local:
    raise ValueError(
        f"process {p} of {n}: its devices hold {len(held)} batch rows "
        f"({min(held)}..{max(held)}), but the input pipeline feeds it {local} rows "
        f"(a contiguous block of B/P). Each process must own its own whole batch "
        f"shards: data * fsdp ({num_batch_shards(mesh)}) a multiple of the {n} processes, "
        "with the mesh's batch axes laid out process by process")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh
                 ) -> dict[str, jax.Array]:
  """This process's rows of the batch -> global arrays sharded over the mesh.

  With one process this is a sharded `device_put`; with several, each process
  passes only its share (rows `[p * B/P, (p + 1) * B/P)` of the global batch).
  """
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh), v)
      for k, v in local_batch.items()
  }
