"""The networks, independent of data and jobs.

    patches.py    patchify / unpatchify in the reference's pixel order
    pos_embed.py  fixed 2-D sin-cos position tables
    masking.py    per-example random-shuffle masking (`jax.random.permutation` + gather)
    vit.py        ViT blocks and the `Encoder` every job shares
    mae.py        `MaskedAutoencoder`: encoder on visible patches, decoder, masked-pixel loss
    classifier.py the encoder with a head for the downstream protocols; position-table resizing
    presets.py    ViT-B/L/H and the small sizes for CPUs
    backbone.py   `ViTBackbone`: the encoder on all patches + ViTDet's simple feature pyramid
    segmenter.py  `Segmenter`: backbone + semantic FPN head; pixel loss, confusion counts
    features.py   `features`: pooled encoder features of unmasked images, on all local devices
"""
