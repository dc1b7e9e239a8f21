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


# --- Damaged checkpoints: reported, moved aside (never deleted), the newest good one resumed.

OPT = {'mu': np.zeros(3, np.float32), 'count': np.asarray(0, np.int32)}


def _workdir_with_steps(tmp_path, steps=(10, 20, 30)):
  workdir = tmp_path / 'wd'
  manager = checkpoint.create_manager(str(workdir), max_to_keep=None, async_save=False)
  for step in steps:
    checkpoint.save_train_checkpoint(manager, step, _params(step),
                                     dict(OPT, count=np.asarray(step, np.int32)), MODEL)
  manager.close()
  return workdir, workdir / 'checkpoints'


def _truncate_arrays(step_dir, item='params'):
  files = [f for f in (step_dir / item).rglob('*') if f.is_file() and f.parent.name == 'd']
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:10])


def _listing(folder):
  return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize('damage', ['truncated params', 'truncated opt_state', 'no commit marker',
                                    'missing item', 'truncated meta'])
def test_damaged_newest_step_is_moved_aside_and_the_next_restores(tmp_path, damage, caplog):
  workdir, ckpts = _workdir_with_steps(tmp_path)
  newest = ckpts / '30'
  if damage.startswith('truncated') and damage != 'truncated meta':
    _truncate_arrays(newest, damage.split()[-1])
  elif damage == 'no commit marker':
    (newest / 'commit_success.txt').unlink()
  elif damage == 'missing item':
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(newest / 'opt_state')
  else:
    (newest / 'meta' / 'metadata').write_text('{"format": "mae_j')
  files_before = sorted(str(p.relative_to(newest)) for p in newest.rglob('*'))
  # The model check reads the newest meta that reads; damage waits for the restore.
  assert checkpoint.check_workdir_compatible(str(workdir), MODEL) == 30
  step, params, opt_state = checkpoint.restore_newest_train_checkpoint(
      str(workdir), _params(0), OPT)
  assert step == 20
  _assert_tree_equal(_params(20), params)
  assert int(opt_state['count']) == 20
  moved = [p for p in ckpts.iterdir() if p.name.startswith('30.corrupt-')]
  assert len(moved) == 1 and _listing(ckpts) == sorted(['10', '20', moved[0].name])
  # Moved, not deleted: every file is still there.
  assert sorted(str(p.relative_to(moved[0])) for p in moved[0].rglob('*')) == files_before
  assert any('step 30' in r.getMessage() and 'cannot be restored' in r.getMessage()
             for r in caplog.records)
  # Orbax neither lists nor deletes the moved folder; load_params does not take it.
  manager = checkpoint.create_manager(str(workdir), max_to_keep=1, async_save=False)
  assert manager.all_steps() == [10, 20]
  checkpoint.save_train_checkpoint(manager, 40, _params(40), OPT, MODEL)
  manager.close()
  assert _listing(ckpts) == sorted(['40', moved[0].name])
  _assert_tree_equal(_params(40), checkpoint.load_params(str(workdir))[0])


def test_half_written_save_is_never_the_newest(tmp_path):
  """A save killed half way leaves orbax's tmp folder: ignored, and deleted by the next
  manager (nothing committed is in it); a folder without the commit marker is not taken."""
  workdir, ckpts = _workdir_with_steps(tmp_path, (10, 20))
  tmp = ckpts / '30.orbax-checkpoint-tmp'
  (tmp / 'params').mkdir(parents=True)
  (tmp / 'params' / 'manifest.ocdbt').write_bytes(b'half')
  assert checkpoint.check_workdir_compatible(str(workdir), MODEL) == 20
  _assert_tree_equal(_params(20), checkpoint.load_params(str(workdir))[0])
  step, _, _ = checkpoint.restore_newest_train_checkpoint(str(workdir), _params(0), OPT)
  assert step == 20 and _listing(ckpts) == sorted(['10', '20', tmp.name])
  manager = checkpoint.create_manager(str(workdir), async_save=False)
  checkpoint.save_train_checkpoint(manager, 30, _params(30), OPT, MODEL)  # saving it again
  manager.close()
  assert _listing(ckpts) == ['10', '20', '30']
  _assert_tree_equal(_params(30), checkpoint.load_params(str(workdir))[0])
  (ckpts / '30' / 'commit_success.txt').unlink()
  _assert_tree_equal(_params(20), checkpoint.load_params(str(workdir))[0])


def test_no_step_restores_raises_and_moves_nothing(tmp_path):
  workdir, ckpts = _workdir_with_steps(tmp_path, (10, 20))
  for step in ('10', '20'):
    _truncate_arrays(ckpts / step)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'(?s)No checkpoint in .* restores.*step 20: .*step 10: .*Nothing '
                           r'was moved'):
    checkpoint.restore_newest_train_checkpoint(str(workdir), _params(0), OPT)
  assert _listing(ckpts) == ['10', '20']
  assert checkpoint.restore_newest_train_checkpoint(str(tmp_path / 'empty'), _params(0),
                                                    OPT) is None
