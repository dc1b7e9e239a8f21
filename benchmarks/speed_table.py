"""README's mae_jax-against-PyTorch table, made from bench_train_step.py's JSON lines.

    python benchmarks/speed_table.py benchmarks/results/cpu_vs_torch_2threads.jsonl

One row per benchmark run (the lines one `bench_train_step.py --torch --repeats N` run
appended: the same shape and settings, in a row, from the same start). Each repeat's
images/s is listed for both frameworks; the ratio is of the medians. Hardware and versions
are taken from the lines themselves.
"""
import argparse
import json
import pathlib
import statistics
from typing import Dict, Iterable, List, Sequence

# What makes two lines the same run (apart from the framework); the CPU peak is measured
# once per run, so it also tells apart runs from before lines carried their start time.
KEY = ('model', 'overrides', 'batch', 'dtype', 'threads', 'cpu_devices', 'host_memory_kept',
       'mask_token_in_encoder', 'started', 'peak_flops_per_s')


def read(paths: Sequence[str]) -> List[dict]:
  """The JSON lines of `paths`, in order."""
  return [json.loads(line) for path in paths for line in pathlib.Path(path).read_text().splitlines()
          if line.strip()]


def _key(row: dict) -> tuple:
  return tuple(json.dumps(row.get(k), sort_keys=True) for k in KEY)


def runs(rows: Iterable[dict]) -> List[List[dict]]:
  """Consecutive lines with the same key, skipping comparison lines and skipped frameworks."""
  groups: List[List[dict]] = []
  for row in rows:
    if 'framework' not in row or 'images_per_s' not in row:
      continue
    if groups and _key(groups[-1][-1]) == _key(row):
      groups[-1].append(row)
    else:
      groups.append([row])
  return groups


def _shape(row: dict) -> str:
  overrides = [o for o in row.get('overrides') or [] if not o.startswith('dtype=')]
  shape = row['model'] + (' (' + ', '.join(overrides) + ')' if overrides else '')
  return shape + (f", {row['cpu_devices']} pmap devices" if row.get('cpu_devices') else '')


def _repeats(values: Sequence[float]) -> str:
  return ' / '.join(f'{v:.3g}' for v in values)


def summarize(group: List[dict]) -> Dict[str, object]:
  """images/s per framework and repeat, their medians and the ratio."""
  speeds = {fw: [r['images_per_s'] for r in group if r['framework'] == fw]
            for fw in ('jax', 'torch')}
  medians = {fw: statistics.median(v) for fw, v in speeds.items() if v}
  jax_row = next((r for r in group if r['framework'] == 'jax'), {})
  torch_row = next((r for r in group if r['framework'] == 'torch'), {})
  return dict(shape=_shape(group[0]), batch=group[0]['batch'], threads=group[0].get('threads'),
              host_memory_kept=group[0].get('host_memory_kept'), speeds=speeds, medians=medians,
              ratio=(medians['jax'] / medians['torch'] if len(medians) == 2 else None),
              started=group[0].get('started'), host_cpu=group[0].get('host_cpu'),
              versions=f"jax {jax_row.get('jax', '?')}, torch {torch_row.get('torch', '?')}")


def markdown(groups: List[List[dict]]) -> str:
  """The table, one line per run."""
  lines = ['| shape | batch | threads | malloc kept | mae_jax img/s (repeats) | PyTorch img/s '
           '(repeats) | mae_jax / PyTorch (medians) | run |',
           '|---|---|---|---|---|---|---|---|']
  for group in groups:
    s = summarize(group)
    if s['ratio'] is None:
      continue
    kept = 'yes' if s['host_memory_kept'] else 'no'  # absent: from before the setting existed
    run = ', '.join(x for x in (s['started'], s['host_cpu'], s['versions']) if x)
    lines.append(f"| {s['shape']} | {s['batch']} | {s['threads']} | {kept} "
                 f"| {_repeats(s['speeds']['jax'])} | {_repeats(s['speeds']['torch'])} "
                 f"| {s['ratio']:.2f}x | {run} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('files', nargs='+', help='bench_train_step.py --json files')
  parser.add_argument('--since', help='only runs started at or after this ISO time')
  args = parser.parse_args()
  groups = runs(read(args.files))
  if args.since:
    groups = [g for g in groups if (g[0].get('started') or '') >= args.since]
  print(markdown(groups))


if __name__ == '__main__':
  main()
