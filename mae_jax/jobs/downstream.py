"""The training loop shared by linear probing and (partial) fine-tuning.

`train_and_evaluate(config, workdir, ...)` checks the config and the checkpoints
first, initialises the classifier from `config.init_from` (or resumes the latest
checkpoint in `workdir`), then runs the step (compiled as `config.parallelism` says, see
parallel.py), evaluates top-1/top-5 on the
eval split every `eval_every_steps` and at the end, saves orbax checkpoints and logs to
TensorBoard, `metrics.jsonl` and `curves.png` (at each checkpoint) like pretraining. `config.eval_only=True` evaluates a
checkpoint (`config.eval_from`, default the workdir's latest) and appends the result to
`eval_only.jsonl`.

Checkpoints hold the WHOLE classifier under `params` (so `checkpoint.load_params` on a
downstream workdir gives a tree that `init_from` and `eval_from` accept) and, under
`opt_state`, `{'opt_state': trained params' optimizer state, 'batch_stats': BN stats}`.
"""
import functools
import json
import time
from typing import Any, Callable, Dict, Iterator, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from mae_jax.data import pipeline
from mae_jax.io import checkpoint
from mae_jax.io import metrics_log
from mae_jax.jobs import architecture
from mae_jax.jobs import classification
from mae_jax.jobs import optim
from mae_jax.jobs import parallel
from mae_jax.jobs import preemption
from mae_jax.jobs import pretrain
from mae_jax.jobs.classification import TrainState

EVAL_ONLY_FILE = 'eval_only.jsonl'


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                  ) -> Tuple[Callable[[Any], Any], int, int]:
  """(lr schedule, total_steps, warmup_steps): warmup + half-cycle cosine, lr scaled by batch."""
  total, warmup = pretrain.schedule_steps(config, steps_per_epoch)
  peak = optim.scaled_lr(config.base_lr, config.batch_size)
  return optim.warmup_cosine_schedule(peak, warmup, total, config.min_lr), total, warmup


def evaluate(p_eval_step, state: TrainState, batches: Iterator[Dict[str, np.ndarray]],
             layout: parallel.Layout) -> Dict[str, float]:
  """Top-1/top-5 (percent) and loss over one pass of the eval split (valid examples only)."""
  totals = None
  for batch in batches:
    sums = jax.tree_util.tree_map(lambda x: np.float64(parallel.scalar(x)),
                                  p_eval_step(state, layout.put_batch(batch)))
    totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
  if totals is None:
    raise ValueError('The evaluation split is empty: check config.dataset.eval_split.')
  return classification.summarize_eval(totals)


def _eval_batches(config, image_size: int):
  return pipeline.create_dataset(
      config.dataset, split=config.dataset.eval_split, mode='eval',
      global_batch_size=config.eval_batch_size, image_size=image_size, seed=config.seed)


def _save(manager, step: int, state: TrainState, record: Dict[str, Any], config,
          layout: parallel.Layout) -> None:
  checkpoint.save_train_checkpoint(
      manager, step, layout.for_checkpoint(classification.merge_params(state.params,
                                                                       state.frozen)),
      layout.for_checkpoint({'opt_state': state.opt_state, 'batch_stats': state.batch_stats}),
      record, config.to_dict())


def _restore_newest(workdir: str, state: TrainState, make_state,
                    layout: parallel.Layout) -> TrainState:
  """The newest step of `workdir` that restores, in a state shaped like `state` (not yet laid
  out for the step); damaged newer steps are moved aside."""
  step, params, extra = checkpoint.restore_newest_train_checkpoint(
      workdir, layout.restore_target(classification.merge_params(state.params, state.frozen)),
      layout.restore_target({'opt_state': state.opt_state, 'batch_stats': state.batch_stats}))
  restored = make_state(params, extra['batch_stats'])
  return restored.replace(opt_state=jax.tree_util.tree_map(jnp.asarray, extra['opt_state']),
                          step=step)


def _restore(manager, step: int, state: TrainState, make_state,
             layout: parallel.Layout) -> TrainState:
  """Restores `step` into a state shaped like `state` (not yet laid out for the step)."""
  params, extra = checkpoint.restore_train_checkpoint(
      manager, step,
      layout.restore_target(classification.merge_params(state.params, state.frozen)),
      layout.restore_target({'opt_state': state.opt_state, 'batch_stats': state.batch_stats}))
  restored = make_state(params, extra['batch_stats'])
  return restored.replace(opt_state=jax.tree_util.tree_map(jnp.asarray, extra['opt_state']),
                          step=step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data_mode: str,
                       create_train_state: Callable[..., TrainState],
                       train_step: Callable[[int], Callable]) -> Dict[str, float]:
  """Runs a downstream job; returns the final (or eval-only) eval metrics.

  Args:
    config: a configs/linear_probe.py, finetune.py or partial_finetune.py config.
    workdir: where checkpoints, metrics.jsonl and TensorBoard events go.
    data_mode: data pipeline mode of the training split ('linear_probe' or 'finetune').
    create_train_state: (model, params, batch_stats, schedule) -> TrainState.
    train_step: (num_classes, parallel.Layout) -> pure step (state, batch, rng) ->
      (state, metrics), averaging over the layout's axis.
  """
  metrics_log.quiet_library_logs()
  # 1. Everything that can be wrong (config, devices, checkpoints, data) fails here.
  config = architecture.resolve(config, architecture.checkpoint_source(config, workdir))
  classification.check_config(config)
  layout = parallel.Layout(config.parallelism)
  pretrain.local_batch_size(config.batch_size)
  pretrain.local_batch_size(config.eval_batch_size)
  ds = config.dataset
  num_classes = int(config.get('num_classes') or pipeline.num_classes(ds))
  model = classification.build_classifier(config, num_classes, bn_axis_name=layout.axis_name)
  record = classification.model_record(config, num_classes)
  image_size = pretrain.input_image_size(config)
  steps_per_epoch = pipeline.num_examples(ds, ds.train_split) // config.batch_size
  if steps_per_epoch == 0 and config.total_steps <= 0:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the training split; '
                     f'lower it or set config.total_steps.')
  schedule, total_steps, warmup = make_schedule(config, steps_per_epoch)
  make_state = lambda params, batch_stats: create_train_state(model, params, batch_stats,
                                                              schedule)
  host_schedule = jax.jit(schedule)
  p_eval_step = layout.compile_eval(functools.partial(classification.eval_step,
                                                       axis_name=layout.axis_name))
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if config.get('eval_only'):
    return evaluate_only(config, workdir, model, make_state, p_eval_step, init_rng, layout)
  latest = checkpoint.check_workdir_compatible(workdir, record, config.to_dict())

  def training_batches(start_step):  # reads its first batch now: a bad file there stops here
    return pipeline.create_dataset(
        ds, split=ds.train_split, mode=data_mode, global_batch_size=config.batch_size,
        image_size=image_size, seed=config.seed, start_step=start_step)

  train_iter = training_batches(latest or 0)

  # 2. The classifier from the pretrained encoder, or the state to continue from.
  if latest is None:
    params, batch_stats = classification.init_params(model, config, init_rng,
                                                     checkpoint.load_params)
  else:
    params, batch_stats = _fresh_init(model, init_rng)
  state = make_state(params, batch_stats)
  if latest is not None:  # the newest step that restores; damaged newer ones are moved aside
    state = _restore_newest(workdir, state, make_state, layout)
    logging.info('Resumed from %s at step %d.', workdir, int(state.step))
  start_step = int(state.step)
  if start_step != (latest or 0):  # the newest checkpoint was damaged
    train_iter = training_batches(start_step)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints,
                                      config.async_checkpointing)
  logging.info('%s: %d classes, %d trained / %d frozen params; %d steps (%d warmup, %d per '
               'epoch), global batch %d, peak lr %.3g, from step %d.', config.job, num_classes,
               _size(state.params), _size(state.frozen), total_steps, warmup, steps_per_epoch,
               config.batch_size, optim.scaled_lr(config.base_lr, config.batch_size), start_step)
  p_train_step = layout.compile_step(train_step(num_classes, layout), state)
  state = layout.put_state(state)
  batches = layout.batches(train_iter, config.prefetch_batches)
  is_main = jax.process_index() == 0
  logger = metrics_log.TrainLogger(workdir, total_steps, start_step, config.batch_size, is_main)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else max(steps_per_epoch, 1)

  # 3. The loop. Metrics stay on device until a log step, so dispatch runs ahead.
  result: Dict[str, float] = {}
  pending = []
  try:
    with preemption.StopOnSignal(manager, total_steps) as stop:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = p_train_step(state, next(batches), jax.random.fold_in(train_rng, step))
        pending.append(metrics)
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          logger.restart_clock(step)
        preempted = stop.should_stop(step)
        save_now = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
        if step % config.log_every_steps == 0 or save_now:  # never save a diverged state
          host_metrics = jax.device_get(pending)
          pending = []
          metrics_log.check_finite(host_metrics, step, manager.latest_step())
          summary = {f'train/{k}': float(np.mean(v)) for k, v in jax.tree_util.tree_map(
              lambda *xs: np.stack([np.ravel(x)[0] for x in xs]), *host_metrics).items()}
          summary['train/lr'] = float(host_schedule(step - 1))
          if ds.get('bad_images') == 'skip':
            summary['train/bad_images_skipped'] = train_iter.bad_images
          logger.log_train(step, summary)
        if step % eval_every == 0 or step == total_steps:
          result = evaluate(p_eval_step, state, _eval_batches(config, image_size), layout)
          logging.info('step %d: eval top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d examples)', step,
                       result['top1'], result['top5'], result['loss'], int(result['count']))
          logger.log_scalars(step, {f'eval/{k}': v for k, v in result.items()})
        if save_now:
          _save(manager, step, state, record, config, layout)
          logger.write_curves()
        if preempted:
          break
  finally:
    manager.wait_until_finished()  # async saves must land even when the loop fails
    manager.close()
    logger.close()
  if not result:  # resumed a finished run: report its accuracy
    result = evaluate(p_eval_step, state, _eval_batches(config, image_size), layout)
  return result


def _size(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def _fresh_init(model, rng) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  variables = classification.init_variables(model, rng)
  return dict(variables['params']), dict(variables.get('batch_stats', {}))


def evaluate_only(config, workdir: str, model, make_state, p_eval_step, rng,
                  layout: parallel.Layout) -> Dict[str, float]:
  """Evaluates the checkpoint at `config.eval_from` (default: `workdir`'s latest step).

  A training checkpoint restores params and BatchNorm statistics; a params-only
  directory (save_params, a converted fine-tuned release) must hold the whole classifier.
  """
  source = config.get('eval_from') or workdir
  ckpt_dir = checkpoint.resolve_checkpoint(source)
  params, batch_stats = _fresh_init(model, rng)
  template = make_state(params, batch_stats)
  if (ckpt_dir / checkpoint.OPT_STATE_ITEM).exists() and ckpt_dir.name.isdigit():
    step = int(ckpt_dir.name)
    manager = checkpoint.create_manager(str(ckpt_dir.parent.parent), None, False)
    state = _restore(manager, step, template, make_state, layout)
    manager.close()
  else:
    loaded, _ = checkpoint.load_params(str(ckpt_dir))
    loaded = _select_like(classification.merge_params(template.params, template.frozen), loaded,
                          str(ckpt_dir))
    if template.batch_stats:
      raise ValueError(f'{ckpt_dir} holds params only, but the linear probe also needs its '
                       f'BatchNorm statistics: evaluate a linear-probe training workdir.')
    state = make_state(loaded, batch_stats).replace(step=0)
  metrics = evaluate(p_eval_step, layout.put_state(state),
                     _eval_batches(config, pretrain.input_image_size(config)), layout)
  result = {'checkpoint': str(ckpt_dir), 'step': int(state.step),
            **{f'eval/{k}': v for k, v in metrics.items()}}
  logging.info('Eval-only %s: top-1 %.2f%%, top-5 %.2f%% on %d examples.', ckpt_dir,
               metrics['top1'], metrics['top5'], int(metrics['count']))
  append_eval_only(workdir, result)
  return metrics


def append_eval_only(workdir: str, result: Dict[str, Any]) -> None:
  """Appends an eval-only `result` (with the time) to <workdir>/eval_only.jsonl (main process)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    with (path / EVAL_ONLY_FILE).open('a') as f:
      f.write(json.dumps({'time': time.time(), **result}) + '\n')


def _select_like(expected: Dict[str, Any], loaded: Dict[str, Any], source: str
                 ) -> Dict[str, Any]:
  """The entries of `loaded` that the classifier has, each checked for shape."""
  exp = traverse_util.flatten_dict(dict(expected), sep='/')
  got = traverse_util.flatten_dict(dict(loaded), sep='/')
  for key, value in exp.items():
    if key not in got:
      raise ValueError(f'{source} lacks {key}: it is not a checkpoint of this classifier '
                       f'(config.model, num_classes, global_pool must match the trained one).')
    if tuple(got[key].shape) != tuple(value.shape):
      raise ValueError(f'{key} has shape {tuple(got[key].shape)} in {source} but '
                       f'{tuple(value.shape)} in the config: set config.model / num_classes '
                       f'to those the checkpoint was trained with.')
  return traverse_util.unflatten_dict({k: got[k] for k in exp}, sep='/')
