"""curves.png: a run's training curves, drawn from its metrics.jsonl.

Every job rewrites `<workdir>/curves.png` at each checkpoint save (`TrainLogger.write_curves`).
One panel per kind of scalar, over steps:

    loss     every '...loss' (pretraining: loss and heldout_loss; downstream: train/loss,
             eval/loss)
    lr       the learning rate
    top-1    accuracies in percent: every '...top1' / '...top5' (eval/top1, knn_top1, ...)
             and the training batches' accuracy (a fraction, shown x100)
    others   one panel each for any other scalar (grad_norm, counts a job adds, ...)

Timing fields (time, images_per_sec, steps_per_sec) and example counts are left out.
Drawn with matplotlib's object API on an Agg canvas: no pyplot state, no display, so it
works in a notebook or a headless job alike and never changes the notebook's backend.
"""
import io
import json
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from etils import epath
import numpy as np

CURVES_FILE = 'curves.png'
PANELS = ('loss', 'lr', 'top-1')
_SKIP = ('step', 'time', 'images_per_sec', 'steps_per_sec', 'count')
_MAX_OTHER_PANELS = 6


def read_records(path: Any) -> List[Dict[str, Any]]:
  """The JSON records of a metrics.jsonl file (a line cut short by a kill is skipped)."""
  records = []
  for line in epath.Path(path).read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and 'step' in record:
      records.append(record)
  return records


def panel_of(key: str) -> Optional[str]:
  """Which panel shows the scalar `key`: 'loss', 'lr', 'top-1', 'other', or None (not shown)."""
  name = key.rsplit('/', 1)[-1]
  if name in _SKIP:
    return None
  if name.endswith('loss'):
    return 'loss'
  if name == 'lr':
    return 'lr'
  if 'top1' in name or 'top5' in name or name == 'accuracy':
    return 'top-1'
  return 'other'


def series(records: Iterable[Mapping[str, Any]]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{scalar name: (steps, values)} in step order; non-numeric and non-finite values dropped."""
  points: Dict[str, List[Tuple[float, float]]] = {}
  for record in records:
    step = record.get('step')
    for key, value in record.items():
      if key == 'step' or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      if math.isfinite(value):
        points.setdefault(key, []).append((float(step), float(value)))
  out = {}
  for key, pts in points.items():
    pts.sort(key=lambda p: p[0])
    steps, values = np.array(pts, np.float64).T
    out[key] = (steps, values)
  return out


def _label(key: str) -> Tuple[str, float]:
  """(legend label, factor): fractions of 1 ('accuracy') are shown in percent."""
  if key.rsplit('/', 1)[-1] == 'accuracy':
    return f'{key} (batch, %)', 100.0
  return key, 1.0


def plot_curves(records: Sequence[Mapping[str, Any]], title: str = '') -> Any:
  """A matplotlib Figure of `records` (metrics.jsonl lines), one panel per kind of scalar.

  Raises ValueError when the records hold no scalar to draw.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  by_panel: Dict[str, List[str]] = {}
  data = series(records)
  for key in sorted(data):
    panel = panel_of(key)
    if panel is not None:
      by_panel.setdefault(panel if panel != 'other' else f'other:{key}', []).append(key)
  names = [p for p in PANELS if p in by_panel]
  names += sorted(p for p in by_panel if p.startswith('other:'))[:_MAX_OTHER_PANELS]
  if not names:
    raise ValueError('no scalars to plot (metrics.jsonl holds no logged step yet).')
  columns = min(len(names), 3)
  rows = -(-len(names) // columns)
  fig = Figure(figsize=(4.2 * columns, 3.0 * rows + (0.4 if title else 0)), dpi=100,
               layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    for key in by_panel[name]:
      steps, values = data[key]
      label, factor = _label(key)
      # Single points (an eval at the end only) are drawn as markers, lines as lines.
      ax.plot(steps, values * factor, label=label, marker='o' if len(steps) < 12 else None,
              markersize=3)
    ax.set_title(name.split(':', 1)[-1])
    ax.set_xlabel('step')
    if name == 'lr':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    if len(by_panel[name]) > 1 or name == 'top-1':
      ax.legend(fontsize=8)
  for ax in axes[len(names):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  return fig


def figure_png(fig: Any) -> bytes:
  """The PNG bytes of a Figure (Agg, no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  return buffer.getvalue()


def write_curves(workdir: Any, metrics_file: str = 'metrics.jsonl') -> epath.Path:
  """Draws `<workdir>/<metrics_file>` into `<workdir>/curves.png`; returns its path.

  The PNG is written next to the final name and then renamed over it, so a viewer
  never sees half a file.
  """
  workdir = epath.Path(workdir)
  records = read_records(workdir / metrics_file)
  last = max((r['step'] for r in records), default=0)
  png = figure_png(plot_curves(records, title=f'{workdir.name}: step {last}'))
  path = workdir / CURVES_FILE
  partial = workdir / (CURVES_FILE + '.partial')
  partial.write_bytes(png)
  partial.replace(path)
  return path
