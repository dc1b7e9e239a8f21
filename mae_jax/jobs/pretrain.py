"""MAE pretraining: the job behind `python -m mae_jax.main --config=configs/vit_b.py --workdir=...`.

Read top to bottom: `create_train_state`, `train_step` (pure; pmapped over the local
devices with gradients averaged by `lax.pmean`, or jitted over a mesh of all devices as
`config.parallelism` says, see parallel.py), `train_and_evaluate` (data, resume, loop,
logs, pictures, checkpoints).

Randomness: parameters are initialised from `split(PRNGKey(seed))[0]`; the masks of step
`s` use `fold_in(train_key, s)` folded again with each example's global stream index, so
a run gives the same masks on any number of devices or hosts and a resumed run continues
exactly.
"""
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from absl import logging
from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mae_jax.data import pipeline
from mae_jax.io import checkpoint
from mae_jax.io import metrics_log
from mae_jax.jobs import knn_monitor
from mae_jax.jobs import optim
from mae_jax.jobs import parallel
from mae_jax.jobs import pictures
from mae_jax.jobs import preemption
from mae_jax.jobs.recipes import CONFIG_FIELDS
from mae_jax.model.mae import MaskedAutoencoder
from mae_jax.model.patches import to_2tuple

AXIS_NAME = parallel.AXIS
Batch = Dict[str, np.ndarray]


# step, params, opt_state; `apply_fn` and `tx` are static fields (not traced, not donated).
TrainState = train_state.TrainState


# ---------------------------------------------------------------------------------------
# Configuration checks: everything that can be wrong is found before anything compiles.


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix for a config this job cannot run."""
  unknown = sorted(set(config.keys()) - set(CONFIG_FIELDS))
  if unknown:
    raise ValueError(f'Unknown config field(s) {unknown} for a pretraining config. Known '
                     f'fields: {sorted(CONFIG_FIELDS)}. Fix the spelling in the config file.')
  missing = sorted(set(CONFIG_FIELDS) - set(config.keys()))
  if missing:
    raise ValueError(f'Config lacks field(s) {missing}; start the config from '
                     f'mae_jax.jobs.recipes.pretrain_config(model_name).')
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size must be positive, got {config.batch_size}.')
  if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 1:
    raise ValueError(f'config.grad_accum_steps must be an integer >= 1 (1: no accumulation), '
                     f'got {config.grad_accum_steps!r}.')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'visualize_every_steps'):
    if config[field] <= 0:
      raise ValueError(f'config.{field} must be positive, got {config[field]}.')
  knn_monitor.check_config(config.monitor)
  parallel.check_mode(config.parallelism)


def local_batch_size(global_batch_size: int) -> int:
  """The per-process batch; raises unless it splits evenly over processes and local devices."""
  processes, devices = jax.process_count(), jax.local_device_count()
  n = processes * devices
  if global_batch_size % n:
    raise ValueError(
        f'config.batch_size={global_batch_size} is not divisible by the number of devices '
        f'({processes} process(es) x {devices} local device(s) = {n}). Use a multiple of '
        f'{n}, e.g. --config.batch_size={max(1, global_batch_size // n) * n}.')
  return global_batch_size // processes


def check_accumulation(global_batch_size: int, accum_steps: int) -> None:
  """Raises unless each device's batch splits into `accum_steps` equal micro-batches."""
  per_device = local_batch_size(global_batch_size) // jax.local_device_count()
  if per_device % accum_steps:
    raise ValueError(
        f'config.grad_accum_steps={accum_steps} does not divide the per-device batch '
        f'{per_device} (batch_size {global_batch_size} over {jax.device_count()} device(s)). '
        f'Use a divisor of {per_device}, or change config.batch_size.')


def create_model(config: ml_collections.ConfigDict) -> MaskedAutoencoder:
  """`MaskedAutoencoder(**config.model)` (with `config.remat`), a clear error for unknown fields."""
  try:
    return MaskedAutoencoder(**config.model, remat=bool(config.get('remat', False)))
  except TypeError as e:
    raise ValueError(f'config.model does not fit MaskedAutoencoder: {e}. Start config.model '
                     f'from mae_jax.model.presets.model_config(name).') from e


def schedule_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Tuple[int, int]:
  """(total_steps, warmup_steps) from explicit steps or from epochs."""
  total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  warmup = (config.warmup_steps if config.warmup_steps >= 0
            else int(round(config.warmup_epochs * steps_per_epoch)))
  if total <= 0:
    raise ValueError('Nothing to train: set config.total_steps or config.num_epochs > 0.')
  if warmup > total:
    raise ValueError(f'Warmup ({warmup} steps) is longer than training ({total} steps): lower '
                     f'config.warmup_epochs / config.warmup_steps.')
  return total, warmup


def create_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optim.WarmupCosine:
  """The per-step lr: `base_lr * batch_size / 256`, linear warmup, half-cycle cosine."""
  total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)
  return optim.warmup_cosine_schedule(optim.scaled_lr(config.base_lr, config.batch_size),
                                      warmup_steps, total_steps, config.min_lr)


# ---------------------------------------------------------------------------------------
# State and step.


def optimizer_args(config: ml_collections.ConfigDict) -> Tuple:
  """The AdamW hyper-parameters of `config.optimizer` as a hashable tuple."""
  opt = config.optimizer
  return (float(opt.weight_decay), float(opt.b1), float(opt.b2), float(opt.eps),
          tuple(opt.no_decay_names))


class TrainingFunctions(NamedTuple):
  """Everything compiled for one (model, optimiser, schedule); see `training_functions`."""
  model: MaskedAutoencoder
  tx: optax.GradientTransformation
  init: Callable
  p_train_step: Callable
  reconstruct: Callable


@functools.lru_cache(maxsize=8)
def training_functions(model: MaskedAutoencoder, opt_args: Tuple, schedule: optax.Schedule,
                       accum_steps: int = 1, mode: str = 'pmap') -> TrainingFunctions:
  """Builds (once per process and setting) the optimiser and the compiled functions.

  `p_train_step` is the step compiled for `parallel.Layout(mode)`; `init` and
  `reconstruct` run on one device (pmap) or lay their outputs out for the mesh (jit).

  Cached because jax caches compilations per function object: a second
  `train_and_evaluate` with the same model, optimiser and schedule (a resumed run in a
  notebook, the tests) reuses the compiled init, step and reconstruction.
  """
  weight_decay, b1, b2, eps, no_decay_names = opt_args
  shapes = jax.eval_shape(model.init, {'params': jax.random.PRNGKey(0),
                                       'mask': jax.random.PRNGKey(0)}, _dummy_images(model))
  tx = optim.adamw(schedule, shapes['params'], weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
                   no_decay_names=no_decay_names)
  layout = parallel.Layout(mode)
  apply = lambda params, images, rng: model.apply({'params': params}, images,
                                                  rngs={'mask': rng})
  if layout.is_pmap:
    return TrainingFunctions(model=model, tx=tx, init=jax.jit(model.init),
                             p_train_step=make_p_train_step(schedule, accum_steps=accum_steps),
                             reconstruct=jax.jit(apply))
  step = functools.partial(train_step, schedule=schedule, accum_steps=accum_steps,
                           axis_name=None, num_shards=layout.num_shards)
  abstract = jax.eval_shape(lambda: _state_from_params(shapes['params'], model, tx))
  return TrainingFunctions(model=model, tx=tx, init=jax.jit(model.init),
                           p_train_step=layout.compile_step(step, abstract),
                           reconstruct=jax.jit(apply, out_shardings=layout.replicated))


def _state_from_params(params: Any, model: MaskedAutoencoder,
                       tx: optax.GradientTransformation) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _dummy_images(model: MaskedAutoencoder) -> jax.ShapeDtypeStruct:
  h, w = to_2tuple(model.img_size)
  return jax.ShapeDtypeStruct((1, h, w, model.in_chans), jnp.float32)


def create_train_state(config: ml_collections.ConfigDict, model: MaskedAutoencoder,
                       rng: jax.Array, schedule: optax.Schedule) -> TrainState:
  """Initialises parameters and the AdamW state (step 0).

  Under pmap on the default device; under jit laid out for the mesh as it is created (an
  FSDP state never exists whole on one device).
  """
  fns = training_functions(model, optimizer_args(config), schedule, config.grad_accum_steps,
                           config.parallelism)
  dummy = jax.ShapeDtypeStruct(_dummy_images(model).shape, jnp.float32)

  def init():
    params = model.init({'params': rng, 'mask': rng}, jnp.zeros(dummy.shape, dummy.dtype))
    return _state_from_params(params['params'], model, fns.tx)

  layout = parallel.Layout(config.parallelism)
  if layout.is_pmap:
    params = fns.init({'params': rng, 'mask': rng}, jnp.zeros(dummy.shape, dummy.dtype))
    return _state_from_params(params['params'], fns.model, fns.tx)
  return jax.jit(init, out_shardings=layout.state_shardings(jax.eval_shape(init)))()


def abstract_train_state(config: ml_collections.ConfigDict, model: MaskedAutoencoder,
                         schedule: optax.Schedule) -> TrainState:
  """The train state's shapes and dtypes (nothing allocated): for memory estimates."""
  fns = training_functions(model, optimizer_args(config), schedule, config.grad_accum_steps,
                           config.parallelism)
  shapes = jax.eval_shape(model.init, {'params': jax.random.PRNGKey(0),
                                       'mask': jax.random.PRNGKey(0)}, _dummy_images(model))
  return jax.eval_shape(lambda p: _state_from_params(p, model, fns.tx), shapes['params'])


def load_init_params(path: str, abstract_params: Any) -> Dict[str, np.ndarray]:
  """The tensors of the checkpoint at `path` that this model has, checked against its shapes.

  The encoder must be there in full with matching shapes; a missing decoder (an
  encoder-only release) keeps its fresh init. Stored position tables of converted
  releases are not params here (the converter checked them against the fixed tables).
  Returns a flat {'encoder/...': array} dict for `with_init_params`.
  """
  ckpt, _ = checkpoint.load_params(path)
  ckpt = traverse_util.flatten_dict(dict(ckpt), sep='/')
  model = traverse_util.flatten_dict(dict(abstract_params), sep='/')
  for key, value in model.items():
    if key in ckpt and tuple(np.shape(ckpt[key])) != tuple(value.shape):
      raise checkpoint.CheckpointError(
          f'config.init_from={path}: {key} has shape {tuple(np.shape(ckpt[key]))} in the '
          f'checkpoint but {tuple(value.shape)} in config.model. Make config.model match the '
          f'checkpoint (size, patch size, img_size).')
  missing = sorted(k for k in model if k not in ckpt)
  if any(k.startswith('encoder/') for k in missing):
    raise checkpoint.CheckpointError(
        f'config.init_from={path} lacks encoder parameter(s) {missing[:3]}: it is not a '
        f'checkpoint of this model. Point it at a pretraining workdir or a converted release.')
  if missing:
    logging.info('config.init_from has no %s: those start from a fresh init.',
                 sorted({k.split('/')[0] for k in missing}))
  return {k: np.asarray(ckpt[k], model[k].dtype) for k in model if k in ckpt}


def with_init_params(params: Any, loaded: Dict[str, np.ndarray]) -> Any:
  """`params` with the tensors of `load_init_params` put in."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  flat.update({k: jnp.asarray(v) for k, v in loaded.items()})
  return traverse_util.unflatten_dict(flat, sep='/')


def train_step(state: TrainState, batch: Batch, rng: jax.Array, schedule: optax.Schedule,
               accum_steps: int = 1, axis_name: Optional[str] = AXIS_NAME,
               num_shards: int = 1) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One AdamW step on the batch it sees; gradients and metrics averaged over all devices.

  Under pmap it sees one device's shard and averages over `axis_name`; under jit
  (`axis_name=None`) it sees the global batch, made of `num_shards` devices' shards.

  Args:
    state: the (replicated) train state.
    batch: {'image': (b, H, W, C), 'index': (b,) global example indices}.
    rng: the run's training key; step s masks with `fold_in(rng, s)`, and example i
      with that folded with `batch['index'][i]`.
    schedule: the learning-rate schedule (bound before pmap), for logging.
    accum_steps: run the shard as this many sequential micro-batches (b divisible by it)
      and average their gradients: the same step with less activation memory.
    axis_name: the pmap axis to average over; None under jit.
    num_shards: device shards in `batch` (jit): each micro-batch takes its share of every
      shard, so micro-batches stay spread over all devices.
  """
  mask_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, micro):
    loss, _, _ = state.apply_fn({'params': params}, micro['image'],
                                example_ids=micro['index'], rngs={'mask': mask_rng})
    return loss

  grad_fn = jax.value_and_grad(loss_fn)
  if accum_steps == 1:
    loss, grads = grad_fn(state.params, batch)
  else:
    def split(x):
      if num_shards == 1:
        return x.reshape((accum_steps, -1) + x.shape[1:])
      x = x.reshape((num_shards, accum_steps, -1) + x.shape[1:]).swapaxes(0, 1)
      return x.reshape((accum_steps, -1) + x.shape[3:])

    micro_batches = jax.tree_util.tree_map(split, batch)

    def accumulate(total, micro):
      return jax.tree_util.tree_map(jnp.add, total, grad_fn(state.params, micro)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
    total, _ = jax.lax.scan(accumulate, zeros, micro_batches)
    # Micro-batches remove equally many patches, so their mean is the shard's loss.
    loss, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, total)
  # Every shard removes the same number of patches, so the mean of per-shard losses
  # (and gradients) is the loss (gradient) of the whole global batch.
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  metrics = {'loss': loss, 'lr': schedule(state.step), 'grad_norm': optax.global_norm(grads)}
  return state.apply_gradients(grads=grads), metrics


def make_p_train_step(schedule: optax.Schedule, devices=None, accum_steps: int = 1
                      ) -> Callable:
  """`train_step` pmapped over `devices` (default: all local ones), donating the state's buffers.

  Donation lets XLA update parameters and optimiser moments in place instead of
  holding two copies of the state.
  """
  step = functools.partial(train_step, schedule=schedule, accum_steps=accum_steps)
  return jax.pmap(step, axis_name=AXIS_NAME, in_axes=(0, 0, None), donate_argnums=(0,),
                  devices=devices)


def step_fields(batch: Batch) -> Batch:
  """What the step uses of a host batch.

  Indices go in as int32: they key the mask together with the step, so only their
  uniqueness within a step matters (wrap-around beyond 2**31 is harmless).
  """
  return {'image': batch['image'], 'index': batch['index'].astype(np.int32)}


def shard_batch(batch: Batch) -> Batch:
  """Host batch -> (local_devices, per_device, ...) for the pmapped step."""
  return parallel.Layout('pmap').put_batch(step_fields(batch))


def summarize(step_metrics: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  """Per-step metrics (replicated over devices under pmap) -> means over the steps; lr of the
  last."""
  summary = {k: float(np.mean([np.ravel(m[k])[0] for m in step_metrics]))
             for k in step_metrics[0]}
  summary['lr'] = float(np.ravel(step_metrics[-1]['lr'])[0])
  return summary


def unreplicate(tree: Any) -> Any:
  """First device's copy of a tree replicated by pmap (see `parallel.Layout.host_state` for
  every mode)."""
  return jax.tree.map(lambda x: x[0], tree)


def input_image_size(config: ml_collections.ConfigDict) -> int:
  """The square input size the data pipeline crops to, from `config.model.img_size`."""
  size = config.model.img_size
  if not isinstance(size, int):
    h, w = size
    if h != w:
      raise ValueError(f'The input pipeline makes square crops; config.model.img_size={size}.')
    size = h
  return size


# ---------------------------------------------------------------------------------------
# The job.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrains (or resumes) in `workdir`; returns the final state, laid out as
  `config.parallelism` runs it (replicated over the local devices under pmap).

  Writes into `workdir`: checkpoints/<step>/ (params, optimiser state, config), metrics.jsonl,
  curves.png (at each checkpoint), TensorBoard events and reconstructions/step_*.png.
  """
  metrics_log.quiet_library_logs()
  # 1. Everything that can be wrong with the config, devices, workdir or data fails here.
  check_config(config)
  check_accumulation(config.batch_size, config.grad_accum_steps)
  model = create_model(config)
  latest = checkpoint.check_workdir_compatible(workdir, config.model.to_dict(), config.to_dict())
  init_params = None
  if latest is None and config.init_from:
    abstract = jax.eval_shape(model.init, {'params': jax.random.PRNGKey(0),
                                           'mask': jax.random.PRNGKey(0)}, _dummy_images(model))
    init_params = load_init_params(config.init_from, abstract['params'])
  ds = config.dataset
  steps_per_epoch = pipeline.num_examples(ds, ds.train_split) // config.batch_size
  if steps_per_epoch == 0 and config.total_steps <= 0:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the training split; '
                     f'lower it or set config.total_steps.')
  schedule = create_schedule(config, steps_per_epoch)
  total_steps = schedule.total_steps
  is_main = jax.process_index() == 0
  layout = parallel.Layout(config.parallelism)
  # Under jit the reconstruction is a computation over the mesh that every process joins.
  draws_pictures = (is_main or not layout.is_pmap) and config.num_visualize > 0
  vis_images = (pictures.heldout_images(config, input_image_size(config))
                if draws_pictures else None)
  if vis_images is not None and not layout.is_pmap and jax.process_count() > 1:
    # Every process reads its own slice of the split; all must reconstruct the same images.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    vis_images = np.asarray(multihost_utils.broadcast_one_to_all(vis_images))
  # Reads its images once (if on).
  monitor = knn_monitor.KnnMonitor(config, total_steps, layout.host_state)

  def training_batches(start_step):  # reads its first batch now: a bad file there stops here
    return pipeline.create_dataset(
        ds, split=ds.train_split, mode='pretrain', global_batch_size=config.batch_size,
        image_size=input_image_size(config), seed=config.seed, start_step=start_step)

  train_iter = training_batches(latest or 0)

  # 2. Model, optimiser, and the state to continue from (the newest checkpoint that restores;
  # damaged newer ones are moved aside before the manager lists the steps).
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  fns = training_functions(model, optimizer_args(config), schedule, config.grad_accum_steps,
                           config.parallelism)
  state = create_train_state(config, model, init_rng, schedule)
  visualizer = (None if vis_images is None else
                pictures.Visualizer(model, config, vis_images, workdir, fns.reconstruct))
  restored = (None if latest is None else
              checkpoint.restore_newest_train_checkpoint(
                  workdir, layout.restore_target(state.params),
                  layout.restore_target(state.opt_state)))
  if restored is not None:
    start_step, params, opt_state = restored
    state = state.replace(step=start_step, params=params, opt_state=opt_state)
    logging.info('Resumed from %s at step %d.', workdir, start_step)
  else:
    start_step = 0
    if init_params is not None:
      # AdamW's moments start at zero whatever the params, so only the params change.
      state = state.replace(params=with_init_params(state.params, init_params))
      logging.info('Initialised from %s.', config.init_from)
  if start_step != (latest or 0):  # the newest checkpoint was damaged
    train_iter = training_batches(start_step)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints,
                                      config.async_checkpointing)
  logging.info('Pretraining %d steps (%d warmup, %s steps/epoch), global batch %d over %d '
               'device(s) in %d process(es) (%s, %d micro-batch(es) per step), from step %d.',
               total_steps, schedule.warmup_steps, steps_per_epoch, config.batch_size,
               jax.device_count(), jax.process_count(), config.parallelism,
               config.grad_accum_steps, start_step)
  state = layout.put_state(state)
  p_train_step = fns.p_train_step

  def save(step):
    checkpoint.save_train_checkpoint(manager, step, layout.for_checkpoint(state.params),
                                     layout.for_checkpoint(state.opt_state),
                                     config.model.to_dict(),
                                     config.to_dict())
    logger.write_curves()

  def picture(step):
    if visualizer is not None:
      loss, image = visualizer(step, unreplicate(state.params) if layout.is_pmap
                               else state.params)
      logging.info('step %d: held-out reconstruction loss %.4f', step, loss)
      logger.log_scalars(step, {'heldout_loss': loss})
      logger.write_image(step, 'reconstruction', image)

  # 3. The loop. Metrics stay on device until a log step, so dispatch runs ahead.
  logger = metrics_log.TrainLogger(workdir, total_steps, start_step, config.batch_size, is_main)
  batches = layout.batches(map(step_fields, train_iter), config.prefetch_batches)
  if start_step == 0:
    picture(0)
    monitor(0, state.params, logger)
  elif start_step >= total_steps:
    logging.info('Step %d of %d reached already: nothing to train.', start_step, total_steps)
  pending = []
  try:
    with preemption.StopOnSignal(manager, total_steps) as stop:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = p_train_step(state, next(batches), train_rng)
        pending.append(metrics)
        first = step == start_step + 1
        preempted = stop.should_stop(step)
        save_now = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
        if first or step % config.log_every_steps == 0 or save_now:  # never save a diverged state
          host_metrics = jax.device_get(pending)
          pending = []
          metrics_log.check_finite(host_metrics, step, manager.latest_step())
          summary = summarize(host_metrics)
          if ds.get('bad_images') == 'skip':
            summary['bad_images_skipped'] = train_iter.bad_images
          logger.log_train(step, summary)
        if first:
          logger.restart_clock(step)  # compiled and run once: speed is measured from here
        if step % config.visualize_every_steps == 0 or step == total_steps:
          picture(step)
        monitor(step, state.params, logger)
        if save_now:
          save(step)
        if preempted:
          break
  finally:
    manager.wait_until_finished()  # async saves must land even when the loop fails
    manager.close()
    logger.close()
  return state
