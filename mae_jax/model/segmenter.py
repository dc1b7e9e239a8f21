"""Semantic segmentation on the MAE backbone: simple pyramid + a light FPN head, and its loss.

`Segmenter` = `ViTBackbone` (encoder + ViTDet simple pyramid, params under 'encoder' and
'pyramid') + `SemanticFPNHead` (params under 'head'), returning per-pixel logits at the
input resolution.

The head is the semantic branch of Panoptic FPN (Kirillov et al. 2019), as mmsegmentation's
`FPNHead` builds it: each level i at stride s_i gets max(1, log2(s_i / s_0)) blocks of
3x3 conv (no bias) + GroupNorm + ReLU, each followed by a 2x bilinear upsampling while
the level is coarser than s_0; the levels are summed at the finest stride s_0 (4), a 1x1
conv gives the class logits (init normal std 0.01, mmseg's `cls_seg`), and they are
upsampled bilinearly (half-pixel centres, PyTorch's align_corners=False) to the input size.

Why this head and not the paper's UperNet: UperNet adds a pyramid pooling module and
an FPN whose 3x3 convs run at 512-768 channels on every level plus a fused 4x-wide 3x3
conv at stride 4; the semantic FPN head has a few 128-channel convs. It keeps the
transfer comparison about the encoder, fits a CPU demo, and the ViTDet pyramid already
provides the multi-scale maps (ViTDet found the top-down FPN path unnecessary on it).
GroupNorm (32 groups), not BatchNorm, so the head has no batch statistics and a step does
not depend on how the batch is split over devices. No dropout before the classifier
(mmseg uses 0.1); drop path in the encoder is keyed per example instead.

`pixel_losses` is the per-pixel cross entropy with an ignore label, as sums (the job
divides by the global count of labelled pixels: the mean over labelled pixels of the
whole batch, like torch's `cross_entropy(ignore_index=255)` on it).
`confusion_matrix` counts (label, prediction) pairs for mean IoU.
"""
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.model.backbone import (STRIDES, ViTBackbone, backbone_features, encoder_kwargs,
                                    level_name, pyramid_plan)

IGNORE_INDEX = 255
# mmcv's kaiming_init default for ConvModule: normal, fan_out, ReLU gain.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def upsample_bilinear(x: jnp.ndarray, hw: Tuple[int, int]) -> jnp.ndarray:
  """(B, h, w, C) -> (B, H, W, C), bilinear with half-pixel centres, no antialiasing (what
  torch's F.interpolate(mode='bilinear', align_corners=False) does)."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, hw[0], hw[1], c), method='bilinear', antialias=False)


class SemanticFPNHead(nn.Module):
  """Panoptic FPN's semantic branch on a pyramid {name: (B, H/s, W/s, C)} -> stride-s_0 logits."""
  num_classes: int
  strides: Tuple[int, ...] = STRIDES
  channels: int = 128
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    groups = math.gcd(self.num_groups, self.channels)
    finest = self.strides[0]
    total = None
    for stride in self.strides:
      name = level_name(stride)
      x = features[name]
      num_blocks = max(1, int(round(math.log2(stride / finest))))
      for k in range(num_blocks):
        x = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, kernel_init=kaiming_fan_out,
                    dtype=self.dtype, name=f'{name}_conv_{k}')(x)
        x = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype,
                         name=f'{name}_norm_{k}')(x)
        x = nn.relu(x)
        if stride != finest:
          x = upsample_bilinear(x, (x.shape[1] * 2, x.shape[2] * 2))
      if total is not None and x.shape[1:3] != total.shape[1:3]:
        # Sizes that the strides do not divide: mmseg resizes each level to the finest.
        x = upsample_bilinear(x, total.shape[1:3])
      total = x if total is None else total + x
    return nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01),
                   bias_init=nn.initializers.zeros, dtype=self.dtype, name='classifier')(total)


class Segmenter(ViTBackbone):
  """ViTBackbone + SemanticFPNHead: images (B, H, W, 3) -> logits (B, H, W, num_classes) f32.

  Attributes (besides ViTBackbone's):
    num_classes: classes of the per-pixel classifier (the ignore label is not one).
    head_channels: width of the head's convs (mmseg FPNHead: 128).
    head_groups: GroupNorm groups of the head (a divisor of head_channels is used).
  """
  num_classes: int = 150
  head_channels: int = 128
  head_groups: int = 32

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False,
               example_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    features = backbone_features(self, images, train, example_ids)
    logits = SemanticFPNHead(self.num_classes, tuple(self.strides), self.head_channels,
                             self.head_groups, jnp.dtype(self.dtype), name='head')(features)
    return upsample_bilinear(logits.astype(jnp.float32), images.shape[1:3])


def segmenter_from_config(model_cfg: Mapping[str, Any], num_classes: int, *,
                          out_channels: int = 256, strides: Sequence[int] = STRIDES,
                          head_channels: int = 128, drop_path_rate: float = 0.0,
                          remat: bool = False) -> Segmenter:
  """A `Segmenter` for the encoder a pretraining `config.model` describes."""
  kwargs = encoder_kwargs(model_cfg)
  pyramid_plan(int(kwargs.get('patch_size', 16)), tuple(strides))
  if int(num_classes) < 1:
    raise ValueError(f'num_classes must be at least 1, got {num_classes}.')
  return Segmenter(num_classes=int(num_classes), out_channels=int(out_channels),
                   strides=tuple(int(s) for s in strides), head_channels=int(head_channels),
                   drop_path_rate=float(drop_path_rate), remat=bool(remat), **kwargs)


def pixel_losses(logits: jnp.ndarray, labels: jnp.ndarray,
                 ignore_index: int = IGNORE_INDEX,
                 valid: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
  """Per-pixel softmax cross entropy, summed over the labelled pixels.

  Args:
    logits: (B, H, W, K) float.
    labels: (B, H, W) int; `ignore_index` (and anything outside [0, K)) is not counted.
    valid: optional (B,) bool; False drops a whole example (eval padding).

  Returns:
    {'loss_sum', 'count' (labelled pixels), 'correct' (argmax hits among them)}, float32.
  """
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  labelled = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    labelled = labelled & valid.reshape((-1,) + (1,) * (labels.ndim - 1))
  safe = jnp.where(labelled, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  hits = jnp.argmax(logits, axis=-1) == safe
  mask = labelled.astype(jnp.float32)
  return {'loss_sum': jnp.sum(nll * mask), 'count': jnp.sum(mask),
          'correct': jnp.sum(hits.astype(jnp.float32) * mask)}


def confusion_matrix(predictions: jnp.ndarray, labels: jnp.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX,
                     valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """(K, K) int32 counts: entry [t, p] = labelled pixels of class t predicted as p.

  Pixels whose label is `ignore_index` or outside [0, K), and examples with `valid`
  False, are not counted.
  """
  labels = labels.astype(jnp.int32)
  labelled = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    labelled = labelled & valid.reshape((-1,) + (1,) * (labels.ndim - 1))
  pair = jnp.where(labelled, labels * num_classes + predictions.astype(jnp.int32), 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[pair.reshape(-1)].add(
      labelled.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)
