"""Training logs a person watches: a progress line, TensorBoard scalars/images, metrics.jsonl,
and curves.png drawn from metrics.jsonl at each checkpoint (`TrainLogger.write_curves`).

Only the main process (index 0) writes files; every process may print progress.
`metrics.jsonl` holds one JSON object per logged step; when a run resumes from step
`s`, records after `s` (written by the interrupted run and about to be redone) are
dropped, so the file reads as one uninterrupted run.
"""
import datetime
import json
import logging as py_logging
import time
from typing import Dict, Mapping, Optional

from absl import logging
from clu import metric_writers
from etils import epath
import numpy as np

from mae_jax.io import curves

METRICS_FILE = 'metrics.jsonl'


def _format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class _DropLibraryInfo(py_logging.Filter):
  """Drops INFO chatter of orbax (dozens of lines per save) from the absl log."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  """Keeps the progress lines readable: library INFO logs are dropped, warnings kept."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Keeps only the records of `path` with step <= `last_step`."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line).get('step', 0) <= last_step:
        kept.append(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
  path.write_text(''.join(l + '\n' for l in kept))


class TrainLogger:
  """Writes scalars to TensorBoard and metrics.jsonl and logs a progress line with ETA."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, images_per_step: int,
               is_main: bool = True):
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self.is_main = is_main
    self._last_time: Optional[float] = None  # the clock starts after the first (compiling) step
    self._last_step = start_step
    self._start_time = time.time()
    self._writer: Optional[metric_writers.MetricWriter] = None
    self._jsonl = None
    self._workdir = epath.Path(workdir)
    if is_main:
      self._workdir.mkdir(parents=True, exist_ok=True)
      self._writer = metric_writers.SummaryWriter(str(self._workdir))
      path = self._workdir / METRICS_FILE
      truncate_jsonl(path, start_step)
      self._jsonl = path.open('a')

  def restart_clock(self, step: int) -> None:
    """Measures speed from now on (call after the first step, so compiling is not counted)."""
    self._last_time, self._last_step = time.time(), step

  def log_train(self, step: int, scalars: Mapping[str, float]) -> Dict[str, float]:
    """Logs training `scalars` at `step` (steps completed) with images/s and ETA.

    Returns the record written: the scalars plus images_per_sec and steps_per_sec once
    the clock runs (`restart_clock`).
    """
    record = {k: float(v) for k, v in scalars.items()}
    values = ' | '.join(f'{k} {v:.4g}' for k, v in scalars.items())
    now = time.time()
    if self._last_time is None:
      logging.info('step %d/%d | %s', step, self.total_steps, values)
      self.log_scalars(step, record)
      return record
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    record['images_per_sec'] = steps * self.images_per_step / seconds
    record['steps_per_sec'] = steps / seconds
    eta = (self.total_steps - step) * seconds / steps
    self._last_time, self._last_step = now, step
    logging.info('step %d/%d | %s | %.1f img/s | ETA %s', step, self.total_steps, values,
                 record['images_per_sec'], _format_duration(eta))
    self.log_scalars(step, record)
    return record

  def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes `scalars` to TensorBoard and metrics.jsonl (main process only)."""
    if self.is_main:
      record = {k: float(v) for k, v in scalars.items()}
      self._writer.write_scalars(step, record)
      self._jsonl.write(json.dumps({'step': step, 'time': time.time(), **record}) + '\n')
      self._jsonl.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Adds a uint8 (H, W, C) image to TensorBoard."""
    if self.is_main:
      self._writer.write_images(step, {name: image[None]})

  def write_curves(self) -> None:
    """Redraws <workdir>/curves.png from metrics.jsonl (main process; call at checkpoints).

    A picture is never worth a run: any failure to draw it is logged as a warning.
    """
    if not self.is_main:
      return
    try:
      self._jsonl.flush()
      curves.write_curves(self._workdir, METRICS_FILE)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not draw %s: %s: %s', self._workdir / curves.CURVES_FILE,
                      type(e).__name__, e)

  def flush(self) -> None:
    if self.is_main:
      self._writer.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.is_main:
      logging.info('Finished in %s.', _format_duration(time.time() - self._start_time))
      self._writer.close()
      self._jsonl.close()
