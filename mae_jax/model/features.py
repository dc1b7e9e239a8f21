"""Features of a pretrained encoder: the way to use MAE's representation.

    feats = features(params, images, model_config)          # {'cls': (N, D), 'mean': (N, D)}
    cls = features(params, images, model_config, pool='cls')  # (N, D)

The encoder runs on all patches (no masking) and ends with its final LayerNorm; 'cls' is
the normed cls token, 'mean' the mean of the normed patch tokens. `params` and
`model_config` are what `mae_jax.io.checkpoint.load_params` returns for a pretraining
workdir, a step folder or a converted release (or a fine-tuned classifier's tree).
"""
import functools
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mae_jax.model.patches import to_2tuple
from mae_jax.model.vit import Encoder

POOLS = ('cls', 'mean')
# Fields of `config.model` the encoder takes; the decoder's and the loss's are ignored.
_ENCODER_FIELDS = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
                   'layer_norm_eps', 'dtype')


def encoder_from_config(model_config: Mapping[str, Any], learn_pos_embed: bool = False
                        ) -> Encoder:
  """The `Encoder` of a `config.model` dict (decoder and loss fields ignored)."""
  kwargs = {k: model_config[k] for k in _ENCODER_FIELDS if k in model_config}
  if isinstance(kwargs.get('img_size'), (list, tuple)):
    kwargs['img_size'] = tuple(kwargs['img_size'])
  kwargs['dtype'] = jnp.dtype(kwargs.get('dtype', 'float32'))
  return Encoder(learn_pos_embed=learn_pos_embed, **kwargs)


def _encoder_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  if 'encoder' in params:
    return params['encoder']
  if 'patch_embed' in params and 'cls_token' in params:
    return params  # an encoder tree already
  raise ValueError(f'params hold no encoder (top-level keys {sorted(params)}): pass what '
                   f'checkpoint.load_params returns, or its params["encoder"].')


@functools.lru_cache(maxsize=16)
def _compiled(encoder: Encoder, pools: Tuple[str, ...], devices: Tuple[Any, ...]):
  mesh = Mesh(np.array(devices), ('batch',))
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = NamedSharding(mesh, PartitionSpec('batch'))

  def run(params, images):
    tokens = encoder.apply({'params': params}, images).astype(jnp.float32)
    out = {'cls': tokens[:, 0], 'mean': jnp.mean(tokens[:, 1:], axis=1)}
    return {p: out[p] for p in pools}

  return (jax.jit(run, in_shardings=(replicated, sharded), out_shardings=sharded), replicated,
          sharded)


def replicate_params(params: Mapping[str, Any]) -> Any:
  """`params` placed on every local device as `features` places them, so that calling
  `features` on many batches with the result copies the parameters once, not per call."""
  mesh = Mesh(np.array(jax.local_devices()), ('batch',))
  return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


def features(params: Mapping[str, Any], images: np.ndarray, model_config: Mapping[str, Any],
             pool: Union[str, Sequence[str]] = POOLS, batch_size: int = 256
             ) -> Union[np.ndarray, Dict[str, np.ndarray]]:
  """Pooled encoder features of `images`, in their order, computed on all local devices.

  Args:
    params: a checkpoint's params ({'encoder': ..., ...}) or an encoder tree.
    images: (N, H, W, C) float, normalised as in training, H x W = model_config's img_size.
    model_config: the `config.model` the params belong to (e.g. from `load_params`).
    pool: 'cls', 'mean', or a sequence of them.
    batch_size: images per call, split over the local devices (rounded up to a multiple of
      their count); the last call is padded, so one compilation serves any N.

  Returns:
    float32 (N, D) for a single pool name, else {name: (N, D)}.
  """
  pools = (pool,) if isinstance(pool, str) else tuple(pool)
  unknown = [p for p in pools if p not in POOLS]
  if unknown or not pools:
    raise ValueError(f'pool={pool!r}: choose from {POOLS}.')
  enc_params = _encoder_params(params)
  encoder = encoder_from_config(model_config, learn_pos_embed='pos_embed' in enc_params)
  images = np.asarray(images)
  h, w = to_2tuple(encoder.img_size)
  chans = int(model_config.get('in_chans', 3))
  if images.ndim != 4 or images.shape[1:] != (h, w, chans):
    raise ValueError(f'images have shape {images.shape}; the encoder takes (N, {h}, {w}, '
                     f'{chans}) (model_config img_size={model_config.get("img_size")}). Resize '
                     f'and centre-crop to that size first, normalised as in training.')
  devices = tuple(jax.local_devices())
  per_call = -(-max(1, batch_size) // len(devices)) * len(devices)
  run, replicated, sharded = _compiled(encoder, pools, devices)
  enc_params = jax.device_put(enc_params, replicated)
  chunks = {p: [] for p in pools}
  for start in range(0, len(images), per_call):
    chunk = images[start:start + per_call].astype(np.float32)
    n = len(chunk)
    if n < per_call:
      chunk = np.concatenate([chunk, np.zeros((per_call - n,) + chunk.shape[1:], np.float32)])
    # Placed explicitly: jit refuses NumPy inputs for a sharding in a multi-process run.
    out = run(enc_params, jax.device_put(chunk, sharded))
    for p in pools:
      chunks[p].append(np.asarray(out[p])[:n])
  dim = int(model_config['embed_dim'])
  result = {p: (np.concatenate(c) if c else np.zeros((0, dim), np.float32))
            for p, c in chunks.items()}
  return result[pools[0]] if isinstance(pool, str) else result
