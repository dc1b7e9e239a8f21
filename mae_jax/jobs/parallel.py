"""Where the train state and the batches live, and how a step is compiled: `config.parallelism`.

- 'pmap' (default): the step is `jax.pmap`ped over the local devices; the state is
  replicated on each of them and the step body averages gradients with `lax.pmean`.
- 'data': the step is `jax.jit`ted over a `Mesh` of all devices (every host's), the batch
  is sharded along it and the state replicated; XLA inserts the gradient all-reduce.
- 'fsdp': as 'data', but every parameter and optimizer moment large enough is split
  over the devices along one dimension (ZeRO-3 / fully sharded data parallel, see
  `fsdp_spec`); XLA gathers each weight where it is used and reduce-scatters its gradient.

A step body is written once, for one shard of the batch: `axis_name` is the pmap axis to
average over, or None under jit (where the body sees the whole global batch). All modes
give the same results up to float summation order, since the masks and the data stream
are keyed by global example index.

Checkpoints: under pmap the state is copied to host NumPy (first replica) before saving;
under jit the global arrays go to orbax as they are, so each process writes only its own
shards, and a restore lays the arrays out for the current run's mesh whatever the mesh
(or mode) that saved them.
"""
import collections
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODES = ('pmap', 'data', 'fsdp')
AXIS = 'batch'
# FSDP shards leaves of at least this many elements; smaller ones (biases, norms, tokens)
# are replicated: splitting them saves little memory and costs a collective each.
FSDP_MIN_SIZE = 2 ** 14

PyTree = Any


def check_mode(mode: Any) -> str:
  """`mode` if it names a parallelism, else a ValueError listing them."""
  if mode not in MODES:
    raise ValueError(f'config.parallelism={mode!r} is not one of {MODES}: pmap (replicated, '
                     f'the default), data (jit, replicated), fsdp (jit, params and optimizer '
                     f'state sharded).')
  return mode


def fsdp_spec(shape: Sequence[int], num_devices: int, min_size: int = FSDP_MIN_SIZE
              ) -> PartitionSpec:
  """The rule: split the largest dimension that `num_devices` divides; replicate the rest.

  Leaves with fewer than `min_size` elements, and those with no dimension divisible by
  the device count, are replicated. Ties go to the last such dimension (for a (in, out)
  kernel of a square layer, the output dimension).
  """
  if num_devices <= 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  best = None
  for dim, size in enumerate(shape):
    if size % num_devices == 0 and (best is None or size >= shape[best]):
      best = dim
  if best is None:
    return PartitionSpec()
  return PartitionSpec(*([None] * best + [AXIS]))


class Layout:
  """One parallelism mode over a set of devices: compiles steps and places their inputs.

  Args:
    mode: one of MODES.
    devices: pmap: the local devices to map over (default all); jit modes: the devices of
      the mesh (default all devices of all processes).
  """

  def __init__(self, mode: str, devices: Optional[Sequence[Any]] = None):
    self.mode = check_mode(mode)
    if mode == 'pmap':
      self.devices = list(devices or jax.local_devices())
    else:
      self.devices = list(devices or jax.devices())
      self.mesh = Mesh(np.array(self.devices), (AXIS,))
      self.replicated = NamedSharding(self.mesh, PartitionSpec())
      self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))

  @property
  def is_pmap(self) -> bool:
    return self.mode == 'pmap'

  @property
  def axis_name(self) -> Optional[str]:
    """The axis a step body averages over: the pmap axis, or None (jit sees the whole batch)."""
    return AXIS if self.is_pmap else None

  @property
  def num_shards(self) -> int:
    """How many devices' shards one call of the step body sees (1 under pmap)."""
    return 1 if self.is_pmap else len(self.devices)

  # --- State --------------------------------------------------------------------------------

  def state_shardings(self, tree: PyTree) -> PyTree:
    """NamedShardings for a (possibly abstract) state tree (jit modes)."""
    if self.mode == 'data':
      return jax.tree.map(lambda _: self.replicated, tree)
    n = len(self.devices)
    return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(np.shape(x), n)), tree)

  def put_state(self, tree: PyTree) -> PyTree:
    """A host (or single-device) state tree laid out for the step."""
    if self.is_pmap:
      # The layout a pmapped step returns (mesh named after its axis), so it compiles once.
      sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))
      n = len(self.devices)

      def put(x):
        x = np.asarray(jax.device_get(x))
        return jax.device_put(np.broadcast_to(x, (n,) + x.shape), sharding)

      return jax.tree.map(put, tree)
    shardings = self.state_shardings(tree)
    if jax.process_count() == 1:
      return jax.device_put(tree, shardings)

    def put(x, sharding):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:  # a global array already
        return x if x.sharding == sharding else jax.device_put(x, sharding)
      host = np.asarray(x)  # the same on every process (same seed, same checkpoint)
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)

  def host_state(self, tree: PyTree) -> PyTree:
    """Host NumPy copies of a state tree (gathers shards: small trees, tests, pictures)."""
    if self.is_pmap:
      return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)

  def for_checkpoint(self, tree: PyTree) -> PyTree:
    """What orbax saves: the first replica on host (pmap), or the global arrays themselves."""
    return self.host_state(tree) if self.is_pmap else tree

  def restore_target(self, tree: PyTree) -> PyTree:
    """The template orbax restores into: host arrays (pmap) or sharded abstract arrays."""
    if self.is_pmap:
      return jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.dtype(x.dtype),
                                                          sharding=s),
                        tree, self.state_shardings(tree))

  # --- Batches ------------------------------------------------------------------------------

  def put_batch(self, batch: PyTree) -> PyTree:
    """A host batch (this process's rows) on the devices: (devices, b, ...) or global arrays."""
    if self.is_pmap:
      n = len(self.devices)
      return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        batch)

  def batches(self, host_batches: Iterable[PyTree], prefetch: int = 2) -> Iterator[PyTree]:
    """`put_batch` of each host batch, `prefetch` batches ahead (transfers overlap the step)."""
    if self.is_pmap:
      from flax import jax_utils  # pylint: disable=g-import-not-at-top
      sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))

      def put(batch):
        return jax.tree.map(lambda x: jax.device_put(x, sharding), self.put_batch(batch))

      if self.devices == jax.local_devices():
        # flax's prefetch lays batches out on a mesh named after the pmap axis, as `put`.
        return jax_utils.prefetch_to_device(map(self.put_batch, host_batches), prefetch,
                                            axis_name=AXIS)
      return _prefetch(map(put, host_batches), prefetch)
    return _prefetch(map(self.put_batch, host_batches), prefetch)

  # --- Steps --------------------------------------------------------------------------------

  def compile_step(self, step: Callable, state_template: PyTree,
                   broadcast_argnums: Tuple[int, ...] = (2,)) -> Callable:
    """`step(state, batch, *rest)` compiled for this layout, the state's buffers donated.

    Arguments at `broadcast_argnums` (the rng) are the same on every device.
    """
    if self.is_pmap:
      in_axes = tuple(None if i in broadcast_argnums else 0 for i in range(3))
      return jax.pmap(step, axis_name=AXIS, in_axes=in_axes, donate_argnums=(0,),
                      devices=self.devices)
    state_sh = self.state_shardings(state_template)
    in_sh = tuple(self.replicated if i in broadcast_argnums else (state_sh if i == 0 else
                                                                  self.batch_sharding)
                  for i in range(3))
    return jax.jit(step, in_shardings=in_sh, out_shardings=(state_sh, self.replicated),
                   donate_argnums=(0,))

  def compile_eval(self, step: Callable) -> Callable:
    """`step(state, batch) -> sums` compiled for this layout (inputs placed by `put_state` and
    `put_batch`; no donation); the sums come back replicated."""
    if self.is_pmap:
      return jax.pmap(step, axis_name=AXIS, devices=self.devices)
    return jax.jit(step, out_shardings=self.replicated)


def bytes_per_device(tree: PyTree, shardings: PyTree) -> int:
  """Bytes of the largest shard of each (abstract) array, summed: what one device holds."""
  def shard_bytes(x, sharding):
    shape = sharding.shard_shape(tuple(np.shape(x)))
    return math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(sum(jax.tree.leaves(jax.tree.map(shard_bytes, tree, shardings))))


def total_bytes(tree: PyTree) -> int:
  return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def scalar(x: Any) -> float:
  """A metric the step returned (replicated per device under pmap) as a Python float."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return float(np.ravel(np.asarray(x))[0])


def _prefetch(iterator: Iterator[PyTree], size: int) -> Iterator[PyTree]:
  queue = collections.deque()
  for item in iterator:
    queue.append(item)
    if len(queue) > max(size, 0):
      yield queue.popleft()
  while queue:
    yield queue.popleft()
