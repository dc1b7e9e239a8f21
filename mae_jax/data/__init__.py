"""Images in, batches out; knows nothing of the model.

    pipeline.py    `create_dataset`: tf.data batches keyed by stream position (exact resume)
    sources.py     TFDS, ImageFolder, the embedded photos and the synthetic scenes as images
    scenes.py      the synthetic segmentation set: textured shapes, exact masks (NumPy, seeded)
    seg_sources.py segmentation examples: scenes, image/mask folders (ADE20K layout), TFDS;
                   the mask checks run before training
    segmentation.py segmentation batches: image and mask augmented together, eval resize
    preprocess.py  RandomResizedCrop, flips, the eval resize, normalisation
    randaugment.py timm's RandAugment and random erasing as stateless TensorFlow ops
    mixup.py       timm's Mixup/CutMix in JAX, inside the fine-tuning step
"""
