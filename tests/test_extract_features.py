"""The feature-extraction job: files, keys, shapes, order, padding, hosts; k-NN in its metrics."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from child_env import child_env
import mae_jax
from mae_jax import MaskedAutoencoder
from mae_jax.data import pipeline
from mae_jax.evaluators import knn
from mae_jax.io import checkpoint
from mae_jax.jobs import extract_features, recipes
from mae_jax.model import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = presets.model_config('tiny').to_dict()


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny MAE's params-only checkpoint at 'step 5' (the format of a converted release)."""
  model = MaskedAutoencoder(**TINY)
  params = jax.jit(model.init)({'params': jax.random.key(1), 'mask': jax.random.key(2)},
                               np.zeros((1, 32, 32, 3), np.float32))['params']
  path = tmp_path_factory.mktemp('ckpt') / 'tiny'
  checkpoint.save_params(str(path), params, TINY, step=5)
  return str(path), jax.device_get(params)


def _config(init_from, **dataset):
  config = recipes.extract_features_config('demo')
  config.init_from = init_from
  config.batch_size = 16  # 72 test tiles: 4 full global batches and a padded one
  config.dataset.update(dataset)
  return config


def _eval_images(ds, split, size=32):
  batch = next(iter(pipeline.create_dataset(ds, split=split, mode='eval', global_batch_size=128,
                                            image_size=size, seed=0)))
  valid = batch['valid']
  return batch['image'][valid], batch['label'][valid]


def test_job_writes_features_in_order_with_knn(pretrained, tmp_path):
  path, params = pretrained
  workdir = tmp_path / 'out'
  config = _config(path)
  result = extract_features.train_and_evaluate(config, str(workdir))
  for split, n in (('train', 8), ('test', 72)):
    with np.load(workdir / f'features_{split}.npz') as f:
      assert sorted(f.files) == ['cls', 'index', 'label', 'mean']
      got = dict(f)
    assert got['cls'].shape == got['mean'].shape == (n, 64)
    assert got['cls'].dtype == got['mean'].dtype == np.float32
    np.testing.assert_array_equal(got['index'], np.arange(n))
    images, labels = _eval_images(config.dataset, split)
    np.testing.assert_array_equal(got['label'], labels)
    expected = mae_jax.features(params, images, TINY)  # the API on the same eval crops
    for pool in ('cls', 'mean'):
      np.testing.assert_allclose(got[pool], expected[pool], rtol=1e-5, atol=1e-5)
  # k-NN of test against train, as the evaluator computes it on the written files.
  with np.load(workdir / 'features_train.npz') as tr, np.load(workdir / 'features_test.npz') as te:
    expected_knn = knn.knn_top1(tr['mean'], tr['label'], te['mean'], te['label'], k=8)
  assert result['knn_top1'] == result['knn_top1_mean'] == pytest.approx(expected_knn)
  assert 0 <= result['logreg_top1_cls'] <= 100
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['step'] == 5 and records[-1]['knn_top1'] == pytest.approx(expected_knn)
  summary = json.loads((workdir / 'features.json').read_text())
  assert summary['files']['test']['count'] == 72 and summary['model']['embed_dim'] == 64
  assert 'index == arange(N)' in summary['order']
  assert list(workdir.glob('events.out.tfevents.*'))
  assert not list(workdir.glob('*.tmp'))


def _image_folder(root, counts):
  rs = np.random.RandomState(0)
  for split, per_class in counts.items():
    for c, name in enumerate(('ant', 'bee', 'cat')):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class[c]):
        pixels = (rs.rand(20, 24, 3) * 80 + 60 * c).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{i:03d}.png')


def test_image_folder_split_with_padding_and_another_resolution(pretrained, tmp_path):
  """An ImageFolder (13 train / 7 test images, batches of 16 and 8 padded), at 48 px: the
  position table is interpolated, and the rows follow the sorted class/file order."""
  path, _ = pretrained
  root = tmp_path / 'folder'
  _image_folder(root, {'train': (5, 4, 4), 'test': (2, 3, 2)})
  config = _config(path, source='imagefolder', data_dir=str(root), train_split='train',
                   eval_split='test')
  config.model.img_size = 48
  config.logreg.enabled = False
  workdir = tmp_path / 'out'
  result = extract_features.train_and_evaluate(config, str(workdir))
  with np.load(workdir / 'features_train.npz') as f:
    np.testing.assert_array_equal(f['label'], [0] * 5 + [1] * 4 + [2] * 4)
    np.testing.assert_array_equal(f['index'], np.arange(13))
    assert f['cls'].shape == (13, 64)
  with np.load(workdir / 'features_test.npz') as f:
    np.testing.assert_array_equal(f['label'], [0, 0, 1, 1, 1, 2, 2])
  # Colour tells the classes apart: k-NN on these features finds most of them.
  assert result['knn_top1'] > 50.0 and 'logreg_top1_cls' not in result


def test_bad_input_fails_before_any_work(pretrained, tmp_path):
  path, _ = pretrained
  with pytest.raises(ValueError, match='init_from'):
    extract_features.train_and_evaluate(_config(None), str(tmp_path / 'a'))
  config = _config(path)
  config.batch_size = 12
  with pytest.raises(ValueError, match='not divisible by the number of devices'):
    extract_features.train_and_evaluate(config, str(tmp_path / 'a'))
  config = _config(path)
  config.model.embed_dim = 32  # does not fit the checkpoint
  with pytest.raises(ValueError, match=r'encoder/\S+ has shape \(.*\) in .* but \(.*\)'):
    extract_features.train_and_evaluate(config, str(tmp_path / 'a'))
  with pytest.raises(checkpoint.CheckpointError, match='nowhere'):
    extract_features.train_and_evaluate(_config(str(tmp_path / 'nowhere')), str(tmp_path / 'a'))
  config = _config(path)
  config.splits = 'test'
  with pytest.raises(ValueError, match="splits='test'"):
    extract_features.train_and_evaluate(config, str(tmp_path / 'a'))
  config = _config(path)
  config.knn.pool = 'max'
  with pytest.raises(ValueError, match="pool='max'"):
    extract_features.train_and_evaluate(config, str(tmp_path / 'a'))
  assert not (tmp_path / 'a').exists()


def test_random_init_baseline_uses_the_default_model(tmp_path):
  config = _config(None)
  config.splits = 'train'
  config.allow_random_init = True
  result = extract_features.train_and_evaluate(config, str(tmp_path / 'r'))
  with np.load(tmp_path / 'r' / 'features_train.npz') as f:
    assert f['cls'].shape == (8, 128)  # recipes' demo default: small_cpu, 128 wide
  assert 'knn_top1' not in result  # one split: nothing to classify


@pytest.mark.slow  # two processes: `pytest -m slow`
def test_two_processes_write_the_same_files_as_one(pretrained, tmp_path):
  """Two processes x 2 devices (jax.distributed over gloo), global batch 16 = 8 per host."""
  path, _ = pretrained
  one = tmp_path / 'one'
  extract_features.train_and_evaluate(_config(path), str(one))
  two = tmp_path / 'two'
  env = child_env(NUM_PROCESSES='2', DEVICES_PER_PROCESS='2',
                  PORT=str(25000 + os.getpid() % 2000), PYTHON=sys.executable)
  run = subprocess.run(
      ['bash', str(REPO / 'launch' / 'local_cpu.sh'), 'configs/extract_features.py', str(two),
       f'--config.init_from={path}', '--config.batch_size=16', '--config.logreg.enabled=False'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  for split in ('train', 'test'):
    with np.load(one / f'features_{split}.npz') as a, np.load(two / f'features_{split}.npz') as b:
      np.testing.assert_array_equal(a['index'], b['index'])
      np.testing.assert_array_equal(a['label'], b['label'])
      np.testing.assert_allclose(a['cls'], b['cls'], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(a['mean'], b['mean'], rtol=1e-5, atol=1e-6)
