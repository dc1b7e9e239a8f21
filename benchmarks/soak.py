"""Soak test: a pretraining run killed again and again ends with the params of an uninterrupted one.

    python benchmarks/soak.py --signal=KILL --kills=10 --root=/tmp/soak
    python benchmarks/soak.py --signal=TERM --kills=10 --root=/tmp/soak

Runs `python -m mae_jax.main` (default: configs/demo.py shortened to --steps steps with a
checkpoint every --checkpoint_every steps) once uninterrupted (kept in ROOT/reference and
reused), then again in ROOT/<signal>, sending the signal at --kills moments and restarting the
same command after each: every third one as soon as a save is under way (orbax's tmp folder
is in checkpoints/), the others at a random time of the restart's training (after its first
progress line). Then it lets the run finish and
compares its final params with the reference's. Prints one line per kill (when, exit status,
newest checkpoint, the step the restart resumed from) and the comparison, and writes them to
ROOT/<signal>.json. Not part of the test suite (tens of minutes on a CPU).
"""
import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--signal', choices=('KILL', 'TERM', 'INT'), default='KILL')
  p.add_argument('--kills', type=int, default=10)
  p.add_argument('--root', default='/tmp/mae_soak')
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--checkpoint_every', type=int, default=50)
  p.add_argument('--seed', type=int, default=0, help='of the kill times')
  p.add_argument('--spread', type=float, default=0.1,
                 help='a random kill falls within this part of the training time after the '
                 "restart's first progress line (small: every kill lands before the run ends)")
  p.add_argument('extra', nargs='*', help='more --config.x=y overrides')
  return p.parse_args()


def command(args, workdir):
  return [sys.executable, '-m', 'mae_jax.main', f'--config={args.config}', f'--workdir={workdir}',
          f'--config.total_steps={args.steps}',
          f'--config.checkpoint_every_steps={args.checkpoint_every}', *args.extra]


def start(args, workdir, log):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(command(args, workdir), cwd=REPO, env=env, stdout=open(log, 'a'),
                          stderr=subprocess.STDOUT)


def committed_steps(workdir):
  folder = pathlib.Path(workdir) / 'checkpoints'
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir()
                if p.name.isdigit() and (p / 'commit_success.txt').exists())


def saving(workdir):
  folder = pathlib.Path(workdir) / 'checkpoints'
  return folder.is_dir() and any('orbax-checkpoint-tmp' in p.name for p in folder.iterdir())


def max_param_difference(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.io import checkpoint  # pylint: disable=g-import-not-at-top
  pa, _ = checkpoint.load_params(str(a))
  pb, _ = checkpoint.load_params(str(b))
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), pa, pb)
  return max(jax.tree.leaves(diffs))


def main():
  args = parse_args()
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  reference = root / 'reference'
  if committed_steps(reference)[-1:] != [args.steps]:
    t0 = time.time()
    rc = start(args, reference, root / 'reference.log').wait()
    assert rc == 0, f'the reference run failed ({rc}): see {root}/reference.log'
    print(f'reference run: {time.time() - t0:.0f} s', flush=True)
  # Seconds the reference spent training (first progress line to the end): the kills fall
  # at a random time of a restart's training, not of its start-up.
  stamps = [(line, re.match(r'^I\d{4} (\d+):(\d+):(\d+)', line))
            for line in (root / 'reference.log').read_text().splitlines()]
  seconds = [(line, int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])) for line, m in stamps if m]
  first = next(t for line, t in seconds if re.search(r'step \d+/', line))
  duration = max(seconds[-1][1] - first, 5)
  workdir = root / args.signal.lower()
  log = root / f'{args.signal.lower()}.log'
  if workdir.exists():
    raise SystemExit(f'{workdir} exists: remove it for a new soak run.')
  rng = random.Random(args.seed)
  signum = getattr(signal, f'SIG{args.signal}')
  events = []
  for kill in range(args.kills):
    before = committed_steps(workdir)
    offset = log.stat().st_size if log.exists() else 0
    proc = start(args, workdir, log)
    t0 = time.time()
    during_save = kill % 3 == 2
    if during_save:
      while not saving(workdir) and proc.poll() is None:
        time.sleep(0.005)
    else:
      while proc.poll() is None and not re.search(
          r'step \d+/', log.read_bytes()[offset:].decode(errors='replace')):
        time.sleep(0.05)  # start-up: imports, compilation, restore
      deadline = time.time() + rng.uniform(0.0, args.spread) * duration
      while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    was_saving = saving(workdir)
    if proc.poll() is not None:
      events.append(dict(kill=kill, note=f'ended by itself with {proc.returncode}'))
      print(events[-1], flush=True)
      break
    proc.send_signal(signum)
    rc = proc.wait()
    text = log.read_bytes()[offset:].decode(errors='replace')  # this start's lines
    resumed = re.findall(r'Resumed from .* at step (\d+)', text)
    events.append(dict(kill=kill, after_s=round(time.time() - t0, 1), during_save=was_saving,
                       exit_status=rc, checkpoints_before=before[-1:],
                       checkpoints_after=committed_steps(workdir),
                       resumed_from=int(resumed[-1]) if resumed else None))
    print(events[-1], flush=True)
  rc = start(args, workdir, log).wait()
  difference = max_param_difference(workdir, reference)
  corrupt = sorted(p.name for p in (workdir / 'checkpoints').iterdir() if 'corrupt' in p.name)
  result = dict(signal=args.signal, kills=events, final_exit_status=rc,
                final_steps=committed_steps(workdir), moved_aside=corrupt,
                max_abs_param_difference_to_uninterrupted=difference)
  print(json.dumps({k: v for k, v in result.items() if k != 'kills'}), flush=True)
  (root / f'{args.signal.lower()}.json').write_text(json.dumps(result, indent=1))
  return 0 if rc == 0 and difference == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
