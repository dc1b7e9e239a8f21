"""Semantic-segmentation fine-tuning: `--config=configs/segmentation.py:vit_b`.

`train_and_evaluate(config, workdir)` checks the config, the checkpoints and the data
(every mask, with `dataset.verify_masks`) first, builds the `Segmenter` (MAE encoder on all
patches + ViTDet simple pyramid + semantic FPN head), loads the encoder from
`config.init_from` (position table interpolated to the new grid) or resumes the workdir's
latest checkpoint, then trains: per-pixel cross entropy over the labelled pixels of the
global batch, AdamW with the fine-tuning weight-decay rule and layer-wise lr decay (the
pyramid and head at scale 1, as BEiT's and mmseg's layer-decay constructors), warmup +
poly (mmcv) or cosine. It evaluates mean IoU, pixel accuracy and mean class accuracy
over the whole eval split every `eval_every_steps` and at the end. `config.eval_only`
evaluates a checkpoint (`eval_from`, default the workdir's latest) into eval_only.jsonl.
Logs go to TensorBoard, `metrics.jsonl` and `curves.png` (redrawn at each checkpoint), as
in the other jobs.

Randomness: drop path is keyed by `fold_in(train_key, step)` and each example's global
stream index, the data by the seed and the stream position: a run does not depend on the
device count and a resumed run continues exactly. Checkpoints hold the whole segmenter
under `params` (`checkpoint.load_params(workdir)` gives it).
"""
import functools
from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from flax.training import train_state

from mae_jax.data import segmentation as seg_data
from mae_jax.io import checkpoint
from mae_jax.io import metrics_log
from mae_jax.jobs import downstream
from mae_jax.jobs import finetune
from mae_jax.jobs import optim
from mae_jax.jobs import parallel
from mae_jax.jobs import preemption
from mae_jax.jobs import pretrain
from mae_jax.jobs import recipes
from mae_jax.model import classifier as classifier_lib
from mae_jax.model import segmenter as segmenter_lib
from mae_jax.model.patches import to_2tuple

SCHEDULES = ('poly', 'cosine')
TrainState = train_state.TrainState


# --- Metrics ---------------------------------------------------------------------------------

def metrics_from_confusion(confusion: np.ndarray) -> Dict[str, Any]:
  """mmseg's metrics from a (K, K) [label, prediction] count matrix.

  IoU_k = TP / (TP + FP + FN); mIoU is their mean over the classes whose union is not
  empty (mmseg's nanmean); pixel accuracy (mmseg's aAcc) = all hits / labelled pixels;
  mean accuracy = mean over classes present in the labels of TP / label pixels. Percent.
  """
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  label_area, pred_area = confusion.sum(1), confusion.sum(0)
  union = label_area + pred_area - hits
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, hits / union, np.nan)
    acc = np.where(label_area > 0, hits / label_area, np.nan)
  total = label_area.sum()
  if total == 0:
    raise ValueError('The evaluation split has no labelled pixels (all ignore label): check '
                     'config.dataset.eval_split, ignore_index and reduce_zero_label.')
  return {'miou': 100.0 * float(np.nanmean(iou)), 'pixel_accuracy': 100.0 * hits.sum() / total,
          'mean_accuracy': 100.0 * float(np.nanmean(acc)), 'pixels': float(total),
          'iou_per_class': [None if np.isnan(v) else 100.0 * float(v) for v in iou]}


# --- Steps -----------------------------------------------------------------------------------

def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray], rng: jnp.ndarray, *,
               ignore_index: int, axis_name: Optional[str] = parallel.AXIS
               ) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  """One AdamW step on the mean cross entropy over the labelled pixels of the global batch.

  Each shard's summed loss gradient is summed over `axis_name` (pmap; None under jit,
  where the body sees the whole batch) and divided by the global labelled-pixel count.
  `rng` is this step's key; drop path folds it with each example's `batch['index']`.
  """
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['image'], train=True,
                            example_ids=batch['index'], rngs={'dropout': rng})
    sums = segmenter_lib.pixel_losses(logits, batch['mask'], ignore_index)
    return sums['loss_sum'], sums

  (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
  count = jnp.maximum(sums['count'], 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / count, grads)
  metrics = {'loss': sums['loss_sum'] / count, 'pixel_accuracy': sums['correct'] / count,
             'grad_norm': optax.global_norm(grads)}
  return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: Mapping[str, jnp.ndarray], *, num_classes: int,
              ignore_index: int, axis_name: Optional[str] = parallel.AXIS
              ) -> Dict[str, jnp.ndarray]:
  """Confusion counts and loss sums over the valid examples, psum'd over `axis_name`."""
  logits = state.apply_fn({'params': state.params}, batch['image'], train=False)
  valid = batch['valid']
  sums = segmenter_lib.pixel_losses(logits, batch['mask'], ignore_index, valid)
  out = {'confusion': segmenter_lib.confusion_matrix(jnp.argmax(logits, -1), batch['mask'],
                                                     num_classes, ignore_index, valid),
         'loss_sum': sums['loss_sum'], 'count': sums['count']}
  return out if axis_name is None else jax.lax.psum(out, axis_name)


def _first_replica(x: Any, layout: parallel.Layout) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  x = np.asarray(x)
  return x[0] if layout.is_pmap else x


def evaluate(p_eval_step, state: TrainState, batches: Iterator[Dict[str, np.ndarray]],
             layout: parallel.Layout) -> Dict[str, Any]:
  """mIoU, pixel and mean accuracy (percent), loss over one pass of the eval split."""
  confusion, loss, count = None, 0.0, 0.0
  for batch in batches:
    sums = p_eval_step(state, layout.put_batch(
        {'image': batch['image'], 'mask': batch['mask'], 'valid': batch['valid']}))
    cm = _first_replica(sums['confusion'], layout).astype(np.int64)
    confusion = cm if confusion is None else confusion + cm
    loss += float(_first_replica(sums['loss_sum'], layout))
    count += float(_first_replica(sums['count'], layout))
  if confusion is None:
    raise ValueError('The evaluation split is empty: check config.dataset.eval_split.')
  result = metrics_from_confusion(confusion)
  result['loss'] = loss / max(count, 1.0)
  return result


# --- Config, model, state --------------------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
  """Every config problem, raised before data or compilation, naming the field."""
  expected = set(recipes.segmentation_config('demo').keys())
  unknown, missing = sorted(set(config.keys()) - expected), sorted(expected - set(config.keys()))
  if unknown or missing:
    raise ValueError(f'Segmentation config: unknown field(s) {unknown}, missing field(s) '
                     f'{missing}. Start from mae_jax.jobs.recipes.segmentation_config(size).')
  if config.job != 'segmentation':
    raise ValueError(f'config.job={config.job!r}: this is the segmentation job.')
  parallel.check_mode(config.parallelism)
  if config.schedule not in SCHEDULES:
    raise ValueError(f'config.schedule={config.schedule!r}: use one of {SCHEDULES}.')
  if not 0 < config.layer_decay <= 1:
    raise ValueError(f'config.layer_decay={config.layer_decay} must be in (0, 1].')
  for field in ('total_steps', 'log_every_steps', 'checkpoint_every_steps', 'batch_size',
                'eval_batch_size'):
    if config[field] <= 0:
      raise ValueError(f'config.{field} must be positive, got {config[field]}.')
  if not config.eval_only and not config.init_from and not config.allow_random_init:
    raise ValueError(
        'The segmentation run has no pretrained encoder: set --config.init_from=<pretraining '
        'workdir or checkpoint dir> (e.g. of `python -m mae_jax.main --config=configs/demo.py '
        '--config.dataset.source=scenes`), or --config.allow_random_init=True for the '
        'random-init baseline.')


def resolve_num_classes(config: ml_collections.ConfigDict) -> int:
  num = config.num_classes or seg_data.num_classes(config.dataset)
  if not num:
    raise ValueError(f'config.num_classes is not set and source {config.dataset.source!r} does '
                     'not define it: set --config.num_classes (ADE20K: 150).')
  return int(num)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> segmenter_lib.Segmenter:
  return segmenter_lib.segmenter_from_config(
      config.model, num_classes, out_channels=config.pyramid_channels,
      strides=tuple(config.pyramid_strides), head_channels=config.head_channels,
      drop_path_rate=config.drop_path_rate, remat=bool(config.remat))


def model_record(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
  """What the params depend on, stored with each checkpoint (resume refuses other models)."""
  record = dict(config.model.to_dict())
  record['segmenter'] = {'num_classes': num_classes, 'pyramid_channels': config.pyramid_channels,
                         'pyramid_strides': list(config.pyramid_strides),
                         'head_channels': config.head_channels}
  return record


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: segmenter_lib.Segmenter, rng: jnp.ndarray) -> Dict[str, Any]:
  image = jnp.zeros((1,) + to_2tuple(model.img_size) + (3,), jnp.float32)
  return model.init(rng, image)['params']


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  peak = optim.scaled_lr(config.base_lr, config.batch_size)
  warmup = max(int(config.warmup_steps), 0)
  if config.schedule == 'poly':
    return optim.warmup_poly_schedule(peak, warmup, config.total_steps, config.poly_power,
                                      config.min_lr, config.warmup_ratio)
  return optim.warmup_cosine_schedule(peak, warmup, config.total_steps, config.min_lr)


def optimizer_args(config: ml_collections.ConfigDict) -> Tuple:
  """The fields `finetune.make_optimizer` reads, as a hashable tuple."""
  return (int(config.model.depth), float(config.layer_decay), float(config.weight_decay),
          float(config.b1), float(config.b2))


class Functions(NamedTuple):
  """What is built once per (model, optimiser, schedule, layout): see `functions`."""
  tx: optax.GradientTransformation
  p_train_step: Callable
  p_eval_step: Callable


@functools.lru_cache(maxsize=8)
def functions(model: segmenter_lib.Segmenter, opt_args: Tuple, schedule: optax.Schedule,
              ignore_index: int, mode: str) -> Functions:
  """The optimiser and the compiled steps, cached: a resumed or eval-only run in the same
  process (notebooks, the tests) reuses the compilations instead of repeating them."""
  depth, decay, weight_decay, b1, b2 = opt_args
  opt_config = ml_collections.ConfigDict(dict(model=dict(depth=depth), layer_decay=decay,
                                              weight_decay=weight_decay, b1=b1, b2=b2))
  abstract = jax.eval_shape(init_params, model, jax.random.PRNGKey(0))
  tx = finetune.make_optimizer(opt_config, schedule, abstract)
  layout = parallel.Layout(mode)
  template = jax.eval_shape(lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx),
                            abstract)
  step = functools.partial(train_step, ignore_index=ignore_index, axis_name=layout.axis_name)
  evaluate_fn = functools.partial(eval_step, num_classes=model.num_classes,
                                  ignore_index=ignore_index, axis_name=layout.axis_name)
  return Functions(tx, layout.compile_step(step, template), layout.compile_eval(evaluate_fn))


def make_state(model, params, config, schedule) -> TrainState:
  """Step-0 train state: `params` with fresh AdamW moments (the cached optimiser)."""
  fns = functions(model, optimizer_args(config), schedule, int(config.dataset.ignore_index),
                  config.parallelism)
  return TrainState.create(apply_fn=model.apply, params=params, tx=fns.tx)


def _check_like(expected: Dict[str, Any], loaded: Dict[str, Any], source: str) -> Dict[str, Any]:
  exp = traverse_util.flatten_dict(dict(expected), sep='/')
  got = traverse_util.flatten_dict(dict(loaded), sep='/')
  for key, value in exp.items():
    if key not in got or tuple(np.shape(got[key])) != tuple(np.shape(value)):
      found = tuple(np.shape(got[key])) if key in got else 'missing'
      raise ValueError(f'{source}: {key} is {found}, the config wants {tuple(np.shape(value))}: '
                       'it is not a checkpoint of this segmenter (config.model, num_classes, '
                       'pyramid/head widths must match the trained one).')
  return traverse_util.unflatten_dict({k: np.asarray(got[k]) for k in exp}, sep='/')


# --- The job ---------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs, resumes or (eval_only) evaluates a segmentation job; returns the eval metrics."""
  metrics_log.quiet_library_logs()
  # 1. Everything that can be wrong (config, devices, checkpoints, data) fails here.
  check_config(config)
  layout = parallel.Layout(config.parallelism)
  pretrain.local_batch_size(config.batch_size)
  pretrain.local_batch_size(config.eval_batch_size)
  num_classes = resolve_num_classes(config)
  model = build_model(config, num_classes)
  image_size = pretrain.input_image_size(config)
  ds = config.dataset
  schedule = make_schedule(config)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  fns = functions(model, optimizer_args(config), schedule, int(ds.ignore_index),
                  config.parallelism)
  p_eval_step = fns.p_eval_step
  eval_batches = lambda: seg_data.create_dataset(
      ds, split=ds.eval_split, mode='eval', global_batch_size=config.eval_batch_size,
      image_size=image_size, seed=config.seed)
  if config.eval_only:
    return evaluate_only(config, workdir, model, schedule, p_eval_step, eval_batches, layout)
  record = model_record(config, num_classes)
  latest = checkpoint.check_workdir_compatible(workdir, record, config.to_dict())
  ckpt = None
  if latest is None and config.init_from:
    ckpt = checkpoint.load_params(config.init_from)
    classifier_lib.check_pretrained_encoder(jax.eval_shape(init_params, model, init_rng),
                                            ckpt[0], str(config.init_from))
  if ds.verify_masks and ds.source != 'scenes':
    for split in dict.fromkeys((ds.train_split, ds.eval_split)):
      logging.info('Checking every mask of %s[%s] (dataset.verify_masks) ...', ds.source, split)
      seg_data.verify_split(ds, split, num_classes, image_size)

  # 2. The segmenter from the pretrained encoder, or the state to continue from.
  params = init_params(model, init_rng)
  if ckpt is not None:
    params = classifier_lib.load_pretrained_encoder(params, *ckpt, model.grid, model.patch_size,
                                                    source=str(config.init_from))
    logging.info('Encoder initialised from %s.', config.init_from)
  elif latest is None:
    logging.warning('No config.init_from: the encoder is RANDOMLY initialised (baseline).')
  state = make_state(model, params, config, schedule)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints,
                                      config.async_checkpointing)
  if latest is not None:
    params, opt_state = checkpoint.restore_train_checkpoint(
        manager, latest, layout.restore_target(state.params), layout.restore_target(
            state.opt_state))
    state = state.replace(step=latest, params=params, opt_state=opt_state)
    logging.info('Resumed from %s at step %d.', manager.directory, latest)
  start_step = int(state.step)
  logging.info('Segmentation: %d classes, %d params, %d steps (%d warmup, %s), global batch %d, '
               'peak lr %.3g, from step %d.', num_classes, _size(state.params), config.total_steps,
               config.warmup_steps, config.schedule, config.batch_size,
               optim.scaled_lr(config.base_lr, config.batch_size), start_step)
  p_train_step = fns.p_train_step
  state = layout.put_state(state)
  train_iter = seg_data.create_dataset(
      ds, split=ds.train_split, mode='train', global_batch_size=config.batch_size,
      image_size=image_size, seed=config.seed, start_step=start_step)
  batches = layout.batches(({'image': b['image'], 'mask': b['mask'],
                             'index': b['index'].astype(np.int32)} for b in train_iter),
                           config.prefetch_batches)
  logger = metrics_log.TrainLogger(workdir, config.total_steps, start_step, config.batch_size,
                                   jax.process_index() == 0)
  host_schedule = jax.jit(schedule)

  # 3. The loop. Metrics stay on device until a log step, so dispatch runs ahead.
  result: Dict[str, Any] = {}
  pending = []
  try:
    with preemption.StopOnSignal(manager, config.total_steps) as stop:
      for step in range(start_step + 1, config.total_steps + 1):
        state, metrics = p_train_step(state, next(batches), jax.random.fold_in(train_rng, step))
        pending.append(metrics)
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          logger.restart_clock(step)
        preempted = stop.should_stop(step)
        save_now = (step % config.checkpoint_every_steps == 0 or step == config.total_steps
                    or preempted)
        if step % config.log_every_steps == 0 or save_now:  # never save a diverged state
          host_metrics = [{k: parallel.scalar(v) for k, v in m.items()} for m in pending]
          pending = []
          metrics_log.check_finite(host_metrics, step, manager.latest_step())
          summary = {f'train/{k}': float(np.mean([m[k] for m in host_metrics]))
                     for k in host_metrics[0]}
          summary['train/lr'] = float(host_schedule(step - 1))
          logger.log_train(step, summary)
        if (config.eval_every_steps > 0 and step % config.eval_every_steps == 0
            ) or step == config.total_steps:
          result = evaluate(p_eval_step, state, eval_batches(), layout)
          logging.info('step %d: eval mIoU %.2f, pixel accuracy %.2f, mean accuracy %.2f (%d '
                       'pixels)', step, result['miou'], result['pixel_accuracy'],
                       result['mean_accuracy'], int(result['pixels']))
          logger.log_scalars(step, {f'eval/{k}': v for k, v in result.items()
                                    if k != 'iou_per_class'})
        if save_now:
          checkpoint.save_train_checkpoint(manager, step, layout.for_checkpoint(state.params),
                                           layout.for_checkpoint(state.opt_state), record,
                                           config.to_dict())
          logger.write_curves()
        if preempted:
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    logger.close()
  if not result:  # resumed a finished run: report its metrics
    result = evaluate(p_eval_step, state, eval_batches(), layout)
  return result


def _size(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def evaluate_only(config, workdir: str, model, schedule, p_eval_step,
                  eval_batches: Callable[[], Iterator], layout: parallel.Layout
                  ) -> Dict[str, Any]:
  """Evaluates `config.eval_from` (default: the workdir's latest checkpoint), appends the
  result to `<workdir>/eval_only.jsonl` and returns it."""
  source = config.eval_from or workdir
  ckpt_dir = checkpoint.resolve_checkpoint(source)
  template = jax.eval_shape(init_params, model, jax.random.PRNGKey(0))
  loaded, _ = checkpoint.load_params(str(ckpt_dir))
  params = _check_like(template, loaded, str(ckpt_dir))
  meta = checkpoint.read_meta(ckpt_dir) or {}
  state = make_state(model, params, config, schedule)
  metrics = evaluate(p_eval_step, layout.put_state(state), eval_batches(), layout)
  result = {'checkpoint': str(ckpt_dir), 'step': meta.get('step'),
            **{f'eval/{k}': v for k, v in metrics.items()}}
  logging.info('Eval-only %s: mIoU %.2f, pixel accuracy %.2f on %d pixels.', ckpt_dir,
               metrics['miou'], metrics['pixel_accuracy'], int(metrics['pixels']))
  downstream.append_eval_only(workdir, result)
  return metrics
