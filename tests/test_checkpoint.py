"""Checkpoint files: params-only save/load, workdir layout, compatibility checks, keep-last-N."""
import numpy as np
import pytest

from mae_jax.io import checkpoint


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {'encoder': {'cls_token': rng.normal(size=(1, 1, 8)).astype(np.float32),
                      'blocks_0': {'attn': {'qkv': {'kernel': rng.normal(size=(8, 24)).astype(
                          np.float32), 'bias': np.zeros(24, np.float32)}}}},
          'decoder': {'pred': {'kernel': rng.normal(size=(4, 6)).astype(np.float32)}}}


MODEL = {'img_size': 32, 'patch_size': 4, 'embed_dim': 8, 'depth': 1, 'norm_pix_loss': False}


def _assert_tree_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _assert_tree_equal(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k])
      assert a[k].dtype == b[k].dtype


def test_save_params_round_trip(tmp_path):
  params = _params()
  checkpoint.save_params(str(tmp_path / 'p'), params, MODEL, step=7)
  loaded, model_config = checkpoint.load_params(str(tmp_path / 'p'))
  _assert_tree_equal(params, loaded)
  assert isinstance(loaded['encoder']['cls_token'], np.ndarray)
  assert model_config == MODEL


def test_save_params_never_overwrites(tmp_path):
  checkpoint.save_params(str(tmp_path / 'p'), _params(0), MODEL)
  with pytest.raises(checkpoint.CheckpointError, match='already exists'):
    checkpoint.save_params(str(tmp_path / 'p'), _params(1), MODEL)
  loaded, _ = checkpoint.load_params(str(tmp_path / 'p'))
  _assert_tree_equal(_params(0), loaded)


def test_load_params_missing_path_names_fix(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='does not exist.*workdir'):
    checkpoint.load_params(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='no mae_jax checkpoint'):
    checkpoint.load_params(str(tmp_path / 'empty'))


def test_load_params_corrupt_checkpoint(tmp_path):
  path = tmp_path / 'p'
  checkpoint.save_params(str(path), _params(), MODEL)
  for f in (path / 'params').rglob('*'):
    if f.is_file() and f.name not in ('commit_success.txt',):
      f.write_bytes(b'garbage')
  with pytest.raises(checkpoint.CheckpointError, match='corrupt'):
    checkpoint.load_params(str(path))


def test_workdir_manager_keeps_last_n_and_load_params_takes_latest(tmp_path):
  workdir = str(tmp_path / 'wd')
  manager = checkpoint.create_manager(workdir, max_to_keep=2, async_save=True)
  opt_state = {'mu': np.zeros(3, np.float32), 'count': np.asarray(0, np.int32)}
  for step in (10, 20, 30):
    checkpoint.save_train_checkpoint(manager, step, _params(step), opt_state, MODEL)
  manager.wait_until_finished()
  assert manager.all_steps() == [20, 30]
  for path in (workdir, f'{workdir}/checkpoints', f'{workdir}/checkpoints/30'):
    loaded, model_config = checkpoint.load_params(path)
    _assert_tree_equal(_params(30), loaded)
    assert model_config == MODEL
  loaded, _ = checkpoint.load_params(f'{workdir}/checkpoints/20')
  _assert_tree_equal(_params(20), loaded)
  params, restored_opt = checkpoint.restore_train_checkpoint(
      manager, 20, _params(0), opt_state)
  _assert_tree_equal(_params(20), params)
  _assert_tree_equal(opt_state, restored_opt)
  manager.close()


def test_incompatible_model_config_refuses_workdir(tmp_path):
  workdir = str(tmp_path / 'wd')
  assert checkpoint.check_workdir_compatible(workdir, MODEL) is None
  manager = checkpoint.create_manager(workdir, async_save=False)
  checkpoint.save_train_checkpoint(manager, 5, _params(), {'c': np.zeros(1)}, MODEL)
  manager.close()
  assert checkpoint.check_workdir_compatible(workdir, MODEL) == 5
  other = dict(MODEL, embed_dim=16, norm_pix_loss=True)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.check_workdir_compatible(workdir, other)
  message = str(e.value)
  assert 'model.embed_dim: 8 -> 16' in message
  assert 'model.norm_pix_loss: False -> True' in message
  assert '--workdir' in message


def test_relative_paths_save_and_restore(tmp_path, monkeypatch):
  """README's demo passes --workdir=runs/demo: orbax refuses relative paths while it saves."""
  monkeypatch.chdir(tmp_path)
  opt_state = {'mu': np.ones(3, np.float32), 'count': np.asarray(5, np.int32)}
  manager = checkpoint.create_manager('runs/wd', max_to_keep=2, async_save=True)
  checkpoint.save_train_checkpoint(manager, 3, _params(3), opt_state, MODEL)
  manager.wait_until_finished()
  manager.close()
  assert checkpoint.check_workdir_compatible('runs/wd', MODEL) == 3
  loaded, _ = checkpoint.load_params('runs/wd')
  _assert_tree_equal(_params(3), loaded)
  manager = checkpoint.create_manager('runs/wd', max_to_keep=2, async_save=True)
  _, restored_opt = checkpoint.restore_train_checkpoint(manager, 3, _params(0), opt_state)
  _assert_tree_equal(opt_state, restored_opt)
  manager.close()
  checkpoint.save_params('release', _params(4), MODEL)
  _assert_tree_equal(_params(4), checkpoint.load_params('release')[0])
  assert (tmp_path / 'runs' / 'wd' / 'checkpoints' / '3' / 'params').is_dir()
