"""The environment of a test's child process: the test's own, less conftest's XLA_FLAGS.

conftest.py gives the test process 8 simulated CPU devices through XLA_FLAGS; a child (a
benchmark, a job, a notebook kernel, a launcher) starts from one device unless it asks for
more, so each test names what it adds.
"""
import os
from typing import Iterable


def child_env(drop: Iterable[str] = (), **extra: str) -> dict:
  """`os.environ` without XLA_FLAGS and the names in `drop`, updated with `extra`."""
  removed = {'XLA_FLAGS', *drop}
  env = {k: v for k, v in os.environ.items() if k not in removed}
  env.update(extra)
  return env
