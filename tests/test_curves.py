"""curves.png: which scalar goes in which panel, the drawn data, the file, and that a failed
drawing never stops a run."""
import json

from absl import logging
import numpy as np
from PIL import Image
import pytest

from mae_jax.io import curves
from mae_jax.io import metrics_log


def _lines(fig):
  """{panel title: {legend label: (steps, values)}} of a Figure plot_curves drew."""
  out = {}
  for ax in fig.axes:
    if ax.get_visible():
      out[ax.get_title()] = {l.get_label(): tuple(map(tuple, l.get_data())) for l in ax.lines}
  return out


def test_pretraining_records_give_loss_lr_and_other_panels():
  records = [
      {'step': 0, 'time': 1.0, 'heldout_loss': 2.0},
      {'step': 1, 'time': 2.0, 'loss': 1.5, 'lr': 1e-4, 'grad_norm': 3.0},
      {'step': 2, 'time': 3.0, 'loss': 1.0, 'lr': 2e-4, 'grad_norm': 2.0,
       'images_per_sec': 100.0, 'steps_per_sec': 2.0},
      {'step': 2, 'time': 3.5, 'heldout_loss': 1.2},
  ]
  lines = _lines(curves.plot_curves(records))
  assert list(lines) == ['loss', 'lr', 'grad_norm']  # timing fields are not drawn
  assert lines['loss'] == {'heldout_loss': ((0.0, 2.0), (2.0, 1.2)),
                           'loss': ((1.0, 2.0), (1.5, 1.0))}
  assert lines['lr'] == {'lr': ((1.0, 2.0), (1e-4, 2e-4))}


def test_downstream_records_give_top1_in_percent_and_new_metrics_appear():
  records = [
      {'step': 2, 'train/loss': 2.0, 'train/accuracy': 0.25, 'train/lr': 0.1},
      {'step': 4, 'train/loss': 1.0, 'train/accuracy': 0.5, 'train/lr': 0.05},
      {'step': 4, 'eval/top1': 40.0, 'eval/top5': 90.0, 'eval/loss': 1.5, 'eval/count': 72.0},
      # What other jobs may add later: an accuracy goes with top-1, anything else gets a panel.
      {'step': 4, 'knn_top1': 35.0, 'bad_images_skipped': 1, 'note': 'text', 'flag': True},
  ]
  lines = _lines(curves.plot_curves(records))
  assert list(lines) == ['loss', 'lr', 'top-1', 'bad_images_skipped']
  assert lines['top-1'] == {
      'eval/top1': ((4.0,), (40.0,)), 'eval/top5': ((4.0,), (90.0,)),
      'knn_top1': ((4.0,), (35.0,)), 'train/accuracy (batch, %)': ((2.0, 4.0), (25.0, 50.0))}
  assert set(lines['loss']) == {'train/loss', 'eval/loss'}


def test_write_curves_writes_a_png_and_skips_a_cut_line(tmp_path):
  lines = [json.dumps({'step': s, 'loss': 1.0 / s, 'lr': 0.1}) for s in range(1, 30)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 30, "lo')
  path = curves.write_curves(tmp_path)
  assert path == tmp_path / 'curves.png'
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size[0] > 400 and image.size[1] > 200
    pixels = np.asarray(image.convert('L'))
  assert pixels.std() > 5  # something is drawn, not a blank canvas
  assert not (tmp_path / 'curves.png.partial').exists()


def test_a_failed_drawing_is_a_warning_not_an_error(tmp_path, monkeypatch):
  logger = metrics_log.TrainLogger(str(tmp_path), total_steps=10, start_step=0,
                                   images_per_step=8)
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  logger.write_curves()  # nothing logged yet: no scalar to draw
  assert len(warnings) == 1 and 'curves.png' in warnings[0] and 'no scalars' in warnings[0]
  logger.log_train(1, {'loss': 1.0, 'lr': 0.1})
  logger.write_curves()
  assert len(warnings) == 1 and (tmp_path / 'curves.png').exists()
  logger.close()


def test_only_the_main_process_draws(tmp_path):
  logger = metrics_log.TrainLogger(str(tmp_path), 10, 0, 8, is_main=False)
  logger.write_curves()
  assert not (tmp_path / 'curves.png').exists()
  logger.close()


def test_no_records_is_a_clear_error():
  with pytest.raises(ValueError, match='no scalars'):
    curves.plot_curves([{'step': 1, 'time': 3.0}])
