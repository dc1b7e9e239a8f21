"""Features of a pretrained encoder: `--config=configs/extract_features.py[:cifar10]`.

python -m mae_jax.main --config=configs/extract_features.py --config.init_from=CKPT --workdir=OUT

Arguments: demo (the embedded photos, the default), cifar10 (needs
--config.dataset.data_dir) or imagenet (TFDS imagenet2012). CKPT is a pretraining workdir,
one of its checkpoints/<step> folders or a converted release; the encoder's architecture
comes from it. Writes OUT/features_<split>.npz (cls, mean, label, index) for the train and
eval splits, and with labels on both the k-NN top-1 and a logistic-regression probe.
"""
from mae_jax.jobs import recipes


def get_config(arg: str = 'demo'):
  return recipes.extract_features_config(arg)
