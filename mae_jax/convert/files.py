"""Reading and writing PyTorch checkpoint files without ever running code from them.

torch is imported inside the functions, so importing mae_jax never imports it. Files are
read with `torch.load(weights_only=True)` (or safetensors): a pickle that would construct
anything but tensors and plain containers is refused, not executed.
"""
import argparse
import os
import pickle
import re
from typing import Any, Mapping

import numpy as np

from mae_jax.convert.names import ConversionError, StateDict


def as_numpy(value: Any) -> np.ndarray:
  """A torch tensor (floats as float32) or array-like as a numpy array."""
  if hasattr(value, 'detach'):  # a torch tensor; torch is not imported here
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
  """The state dict inside a loaded checkpoint object ({'model': sd}, {'state_dict': sd}, sd)."""
  if isinstance(obj, Mapping):
    for entry in ('model', 'state_dict', 'model_state'):
      if isinstance(obj.get(entry), Mapping):
        return obj[entry]
    if obj and all(hasattr(v, 'shape') for v in obj.values()):
      return obj
  keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
  raise ConversionError(f'{path} holds no state dict (found {keys}); expected '
                        f"{{'model': state_dict}} as in the MAE release, or a state dict.")


def read_state_dict(path: str) -> StateDict:
  """Reads a `.pth` / `.bin` (torch) or `.safetensors` file; returns its state dict as numpy.

  torch files are read with `torch.load(weights_only=True)`: a pickle that would construct
  anything but tensors and plain containers (i.e. run code) is refused, not executed. The
  release's training checkpoints also hold an `argparse.Namespace`, which is allowed.
  """
  if not os.path.exists(path):
    raise ConversionError(f'{path} does not exist: pass the path of a .pth or .safetensors file.')
  if os.path.isdir(path):
    raise ConversionError(f'{path} is a directory, not a PyTorch checkpoint file.')
  with open(path, 'rb') as f:
    head = f.read(16)
  if path.endswith('.safetensors') or head[8:9] == b'{':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    except Exception as e:  # safetensors raises its own SafetensorError
      raise ConversionError(f'{path} is not a readable safetensors file ({e}).') from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError('Reading .pth files needs torch: pip install "mae_jax[torch]" (CPU '
                          'build is enough).') from None
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # The safe unpickler stops at the first thing that is not a tensor or plain container:
    # an import of a callable ('Unsupported global') or other object building is refused;
    # an unknown opcode ('Unsupported operand') means the bytes are not a pickle at all.
    detail = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    if 'Weights only load failed' in str(e) and 'Unsupported operand' not in str(e):
      what = f' ({detail.group(1)})' if detail else ''
      raise ConversionError(
          f'{path} was refused: it holds a Python object{what} whose loading would run code, and '
          f'only tensors are read (torch.load weights_only=True). Use a file from the official '
          f'release or re-save just the state dict from a source you trust.') from None
    raise ConversionError(f'{path} is not a PyTorch checkpoint (unpickling failed: '
                          f'{str(e).splitlines()[0]}).') from None
  except Exception as e:  # torch raises many types for files that are not checkpoints
    first = (str(e).splitlines() or [''])[0]
    raise ConversionError(f'{path} is not a PyTorch checkpoint ({type(e).__name__}: '
                          f'{first}).') from None
  state = _state_dict_of(obj, path)
  bad = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if bad:
    raise ConversionError(f'{path}: state dict entries {bad[:5]} are not tensors.')
  return {k: as_numpy(v) for k, v in state.items()}


def write_state_dict(path: str, state_dict: Mapping[str, np.ndarray], format: str = 'official'
                     ) -> None:  # pylint: disable=redefined-builtin
  """Writes a numpy state dict for PyTorch, never over an existing file.

  'official' -> `torch.save({'model': state_dict})`, loadable by the MAE release and
  timm-style ViTs; 'hf' / 'hf_classic' -> a plain state dict (`pytorch_model.bin` style), or a
  safetensors file when `path` ends in `.safetensors`.
  """
  if os.path.exists(path):
    raise ConversionError(f'{path} already exists; nothing was written. Choose a new output '
                          f'path or delete the old file first.')
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in
             state_dict.items()}
  tmp = f'{path}.tmp-{os.getpid()}'
  if path.endswith('.safetensors'):
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, tmp)
  else:
    torch.save({'model': tensors} if format == 'official' else tensors, tmp)
  os.replace(tmp, path)

