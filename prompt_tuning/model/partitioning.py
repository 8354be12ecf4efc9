"""Meshes, logical-axis rules and shardings: how parameters, state and batches are placed.

The model annotates every parameter and activation with T5X logical axis names; the rules here
map them onto a `('data', 'model')` mesh. The prompt's axes are replicated by default (it is tiny,
and replication keeps its update local). Works the same on one CPU, one GPU or a multi-host pod.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]

# T5X's standard rules with 1-D parameter partitioning (model parallelism over 'model').
_BASE_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
    ("mlp_activations", None),
    ("prompt", None),
    ("prompt_embed", None),
    ("prompt_bank", None),
    ("prompt_layers", None),
    ("prompt_tasks", None),
    ("prompt_embed_out", None),
)


def standard_logical_axis_rules(parameter_partitioning_dims: int = 1,
                                prompt_rules: Rules = ()) -> Rules:
  """T5X-style rules. 2-D partitioning also shards parameters' `embed` axis over 'data'.

  Activations carry `embed` too, but their `batch` already claims 'data', and flax assigns each
  mesh axis at most once per array, so `embed -> data` only applies to parameters.
  `prompt_rules` come first so a user can, e.g., shard a huge prompt bank.
  """
  if parameter_partitioning_dims not in (1, 2):
    raise ValueError(f"parameter_partitioning_dims must be 1 or 2, got "
                     f"{parameter_partitioning_dims}")
  embed = (("embed", "data"),) if parameter_partitioning_dims == 2 else (("embed", None),)
  overridden = {name for name, _ in prompt_rules}
  base = tuple(r for r in _BASE_RULES if r[0] not in overridden)
  return tuple(prompt_rules) + base + embed


def make_mesh(num_partitions: int | None = None, *,
              model_parallel_submesh: Sequence[int] | None = None,
              mesh_shape: Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'model')` mesh over all (global) devices.

  Give at most one of `num_partitions` (the model-parallel size), `model_parallel_submesh`
  (T5X's per-replica device block, e.g. (2, 2, 1, 2); its product is the model-parallel size)
  or an explicit `mesh_shape` (data, model). With none, everything is data parallel.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  given = [x is not None for x in (num_partitions, model_parallel_submesh, mesh_shape)]
  if sum(given) > 1:
    raise ValueError("Give only one of num_partitions, model_parallel_submesh, mesh_shape")
  if mesh_shape is not None:
    data, model = (int(x) for x in mesh_shape)
  else:
    if model_parallel_submesh is not None:
      model = math.prod(int(x) for x in model_parallel_submesh)
    else:
      model = int(num_partitions or 1)
    if model <= 0 or n % model:
      raise ValueError(f"The model-parallel size {model} must divide the number of devices {n}")
    data = n // model
  if data * model != n:
    raise ValueError(f"mesh_shape {(data, model)} needs {data * model} devices, found {n}")
  # Keep each model-parallel group on consecutive devices (on one host where possible).
  return Mesh(devices.reshape(data, model), ("data", "model"))


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A mesh plus the logical-axis rules that place every array on it."""

  mesh: Mesh
  rules: Rules = dataclasses.field(default_factory=standard_logical_axis_rules)

  @classmethod
  def create(cls, num_partitions: int | None = None, *,
             model_parallel_submesh: Sequence[int] | None = None,
             mesh_shape: Sequence[int] | None = None,
             parameter_partitioning_dims: int = 1,
             num_devices: int | None = None) -> "Partitioner":
    devices = None if num_devices is None else jax.devices()[:num_devices]
    mesh = make_mesh(num_partitions, model_parallel_submesh=model_parallel_submesh,
                     mesh_shape=mesh_shape, devices=devices)
    return cls(mesh, standard_logical_axis_rules(parameter_partitioning_dims))

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape["data"]

  @contextlib.contextmanager
  def activate(self):
    """Mesh and rules in scope, so `with_logical_constraint` inside the model takes effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)
    return NamedSharding(self.mesh, spec)

  def shardings_from_boxed(self, boxed_tree) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` boxes (e.g. `jax.eval_shape(model.init)`)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def shard_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays split over 'data'.

    Every host passes its own slice of the global batch (its `seqio.ShardInfo` shard); with one
    process this is the whole batch.
    """
    sharding = self.batch_sharding()
    out = {}
    for name, local in host_batch.items():
      local = np.asarray(local)
      global_rows = local.shape[0] * jax.process_count()
      if global_rows % self.data_parallel_size:
        raise ValueError(
            f"The global batch size {global_rows} is not divisible by the {self.data_parallel_size}"
            " data-parallel devices; choose BATCH_SIZE as a multiple of it (or change the mesh).")
      out[name] = jax.make_array_from_process_local_data(sharding, local)
    return out


def host_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch that every host holds in full."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  out = {}
  for k, v in batch.items():
    if v.shape[0] % n:
      raise ValueError(f"Batch size {v.shape[0]} is not divisible by the {n} processes")
    per = v.shape[0] // n
    out[k] = v[i * per:(i + 1) * per]
  return out


def to_host(x) -> np.ndarray:
  """A global array as numpy on every process (gathering shards from other hosts if needed)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place(tree, shardings):
  """`jax.device_put` of a tree onto matching shardings (host numpy or device arrays)."""
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)
