"""Images in, batches out; knows nothing of the model.

    pipeline.py    `create_dataset`: tf.data batches keyed by stream position (exact resume)
    sources.py     TFDS, ImageFolder and the embedded photos
    preprocess.py  RandomResizedCrop, flips, the eval resize, normalisation
    randaugment.py timm's RandAugment and random erasing as stateless TensorFlow ops
    mixup.py       timm's Mixup/CutMix in JAX, inside the fine-tuning step
"""
