"""Model sizes of the paper (MAE.md section 3) and small ones for tests and CPU demos.

`model_config(name)` returns the `config.model` block that `MaskedAutoencoder(**config.model)`
takes; configs in `configs/` start from it and override what their experiment changes.
"""
# Decoder of the paper, shared by all sizes: width 512, 8 blocks, 16 heads.
PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

MODELS = {
    # ViT-Ti/16 and ViT-S/16 (DeiT's widths) with the paper's decoder: CPU-sized benchmarks.
    'vit_ti': dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                   **PAPER_DECODER),
    'vit_s': dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                  **PAPER_DECODER),
    'vit_b': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                  **PAPER_DECODER),
    'vit_l': dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                  **PAPER_DECODER),
    'vit_h': dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                  **PAPER_DECODER),
    # Past the paper, as the scaling work after MAE pretrains them (patch 14, MLP 4x): ViT-2B
    # (MAE pre-pretraining, Singh et al. 2023) and ViT-6.5B; for config.parallelism='fsdp'.
    'vit_2b': dict(img_size=224, patch_size=14, embed_dim=2560, depth=24, num_heads=32,
                   **PAPER_DECODER),
    'vit_6.5b': dict(img_size=224, patch_size=14, embed_dim=4096, depth=32, num_heads=32,
                     **PAPER_DECODER),
    # A few hundred thousand parameters on 32x32 images: unit tests.
    'tiny': dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
    # Small enough to pretrain for a few thousand steps on two CPU cores.
    'small_cpu': dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
}


def model_config(name: str, **overrides) -> 'ml_collections.ConfigDict':
  """`config.model` for a named size, with the paper's defaults for everything else."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if name not in MODELS:
    raise ValueError(f'Unknown model size {name!r}; choose one of {sorted(MODELS)}.')
  cfg = dict(in_chans=3, mlp_ratio=4.0, norm_pix_loss=False, mask_ratio=0.75,
             mask_token_in_encoder=False, layer_norm_eps=1e-6, dtype='float32')
  cfg.update(MODELS[name])
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f'Unknown model field(s) {sorted(unknown)}; known: {sorted(cfg)}.')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)
