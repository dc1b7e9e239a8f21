"""The notebooks run top to bottom in a real Jupyter kernel, fast (MAE_NOTEBOOK_FAST=1).

Each run works like papermill's: the test's values for the notebook's parameters go in a
cell after the one tagged `parameters` (work directories under pytest's tmp_path), and a
last cell prints what the test checks as JSON. Any cell error fails the test with its
traceback. The kernel is this interpreter's (a kernel spec written here), so the tests work
in an unactivated virtual environment; it sees one CPU device, as a laptop does.

The four runs start together in one module fixture, two kernels at a time (most of a
kernel's time is single-threaded: imports and XLA compiling), and share a JAX compilation
cache, so the notebooks' common steps compile once.
"""
import asyncio
import json
import os
import pathlib
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip('nbformat', reason='the notebook tests need nbformat (.[test])')
nbclient = pytest.importorskip('nbclient', reason='the notebook tests need nbclient (.[test])')
pytest.importorskip('ipykernel', reason='the notebook tests need ipykernel (.[test])')
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from child_env import child_env  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
NAMES = ('1_reconstructions.ipynb', '2_pretrain_and_evaluate.ipynb', '3_use_the_encoder.ipynb')
KERNEL = 'mae_jax_test'
PARALLEL_KERNELS = 2


def _kernel_manager(root: pathlib.Path) -> AsyncKernelManager:
  spec_dir = root / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True, exist_ok=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'mae_jax tests', 'language': 'python'}))
  specs = KernelSpecManager(kernel_dirs=[str(root / 'kernels')], ensure_native_kernel=False)
  return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _kernel_env(cache_dir: str) -> dict:
  return child_env(MAE_NOTEBOOK_FAST='1', JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
                   TF_CPP_MIN_LOG_LEVEL='3', JAX_COMPILATION_CACHE_DIR=cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')  # one device


class Run:
  """One execution of a notebook: parameters to set, then `probe` (code that sets `result`)."""

  def __init__(self, name: str, root: pathlib.Path, parameters: str, probe: str):
    self.name, self.root = name, root
    self.nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    tagged = [i for i, c in enumerate(self.nb.cells)
              if 'parameters' in c.metadata.get('tags', [])]
    assert len(tagged) == 1, f'{name}: one cell must be tagged "parameters"'
    self.nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))
    self.nb.cells.append(nbformat.v4.new_code_cell(
        probe + '\nimport json\nprint(json.dumps(result))'))
    self.error = None

  async def execute(self, env: dict) -> None:
    client = nbclient.NotebookClient(self.nb, km=_kernel_manager(self.root), timeout=300,
                                     resources={'metadata': {'path': str(NOTEBOOKS)}})
    try:
      await client.async_execute(env=env)
    except Exception as e:  # pylint: disable=broad-except
      self.error = e  # CellExecutionError names the cell and holds its traceback

  def result(self):
    """(what the probe printed, the number of images the notebook showed); raises cell errors."""
    if self.error is not None:
      raise self.error
    last = self.nb.cells[-1].outputs
    text = ''.join(o.get('text', '') for o in last if o.output_type == 'stream')
    images = sum('image/png' in o.get('data', {}) for c in self.nb.cells
                 if c.cell_type == 'code' for o in c.outputs)
    return json.loads(text.strip().splitlines()[-1]), images


def _tiny_params(seed: int, **overrides):
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import MaskedAutoencoder  # pylint: disable=g-import-not-at-top
  from mae_jax.model import presets  # pylint: disable=g-import-not-at-top
  model_config = dict(presets.model_config('tiny', **overrides))
  params = MaskedAutoencoder(**model_config).init(
      {'params': jax.random.key(seed), 'mask': jax.random.key(seed)},
      np.zeros((1, 32, 32, 3), np.float32))['params']
  return params, model_config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every notebook run of this module, executed (in this order, PARALLEL_KERNELS at once)."""
  from mae_jax import convert  # pylint: disable=g-import-not-at-top
  from mae_jax.io import checkpoint  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('notebooks')
  cache = str(base / 'jax_compilation_cache')
  out = {}

  # 2: pretraining with the live plot, linear probe and partial fine-tune, MAE and random.
  root = base / 'pretrain_and_evaluate'
  out['pretrain_and_evaluate'] = Run(
      NAMES[1], root, f"RUNS = pathlib.Path({str(root / 'runs')!r})\n"
      "WORKDIR = str(RUNS / 'mae_demo')",
      "result = {'results': [[n, i, v] for (n, i), v in results.items()],\n"
      "          'live_updates': live.updates, 'workdirs': [str(w) for w in workdirs.values()]}")

  # 1 with a release: a tiny encoder + decoder written as an official .pth (torch.save).
  root = base / 'release'
  root.mkdir()
  if _has_torch():
    params, model_config = _tiny_params(3, norm_pix_loss=True)
    release = root / 'mae_visualize_vit_tiny.pth'
    convert.export_pytorch_checkpoint(str(release), params, model_config, 'official')
    np.savez(root / 'expected.npz', **_flat(params))
    out['release'] = Run(
        NAMES[0], root,
        f"RELEASE = {str(release)!r}\nRELEASE_NORM_PIX = True\n"
        f"WORKDIR = {str(root / 'runs' / 'mae_demo')!r}",
        "from flax import traverse_util\n"
        f"np.savez({str(root / 'converted.npz')!r}, "
        "**{'/'.join(k): v for k, v in traverse_util.flatten_dict(params).items()})\n"
        "result = {'kind': converted.kind, 'converted_dir': str(converted_dir),\n"
        "          'shape': list(images.shape), 'norm_pix': model.norm_pix_loss}")

  # 1 without: the quick pretraining.
  root = base / 'reconstructions'
  out['reconstructions'] = Run(
      NAMES[0], root, f"WORKDIR = {str(root / 'runs' / 'mae_demo')!r}\nMASK_RATIO = 0.5",
      "result = {'panels': {k: [list(v.shape), float(v.min()), float(v.max())]\n"
      "                     for k, v in panels.items()},\n"
      "          'mask_mean': float(mask.mean()), 'norm_pix': model.norm_pix_loss,\n"
      "          'figure': str(FIGURE), 'loss': float(loss)}")

  # 3 on the user's own checkpoint (CHECKPOINT): a params-only folder, as a converted release.
  root = base / 'use_the_encoder'
  params, model_config = _tiny_params(1)
  checkpoint.save_params(str(root / 'mine'), params, model_config)
  out['use_the_encoder'] = Run(
      NAMES[2], root,
      f"CHECKPOINT = {str(root / 'mine')!r}\nWORKDIR = {str(root / 'runs' / 'mae_demo')!r}",
      "result = {'feats': {e: {p: list(v.shape) for p, v in f.items()}\n"
      "                    for e, f in feats.items()},\n"
      "          'coords': [list(v.shape) for v in coords.values()], 'pca': str(PCA_FIGURE),\n"
      "          'same_photo': list(same_photo.values()), 'labels': sorted(set(labels.tolist())),\n"
      "          'cls': feats['pretrained']['cls'][:2].tolist()}")
  out['use_the_encoder'].params = (params, model_config)

  async def execute_all():
    slots = asyncio.Semaphore(PARALLEL_KERNELS)
    env = _kernel_env(cache)

    async def one(run):
      async with slots:
        await run.execute(env)

    await asyncio.gather(*(one(r) for r in out.values()))

  asyncio.run(execute_all())
  return out


def _has_torch() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec('torch') is not None


def _flat(params) -> dict:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_committed_notebooks_are_clean_and_open_with_a_description_and_an_install():
  assert sorted(p.name for p in NOTEBOOKS.glob('*.ipynb')) == sorted(NAMES)
  for name in NAMES:
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f'{name} is committed with outputs: clear them (Jupyter: Edit > Clear outputs)')
    assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith('# ')
    assert 'pip' in nb.cells[1].source and nb.cells[1].cell_type == 'code'  # the one install
    assert 'MAE_NOTEBOOK_FAST' in ''.join(c.source for c in code)


def test_reconstructions_notebook_from_a_quick_pretraining(runs):
  out, shown = runs['reconstructions'].result()
  assert shown == 2  # the figure and the norm-pix comparison
  assert list(out['panels']) == ['original', 'masked', 'reconstruction',
                                 'reconstruction + visible']
  for shape, low, high in out['panels'].values():
    assert shape == [6, 32, 32, 3] and 0 <= low < high <= 1
  assert out['mask_mean'] == 0.5  # the MASK_RATIO parameter reached the model
  assert out['norm_pix'] and np.isfinite(out['loss'])
  assert (runs['reconstructions'].root / 'runs' / 'mae_demo' / 'checkpoints').is_dir()
  assert pathlib.Path(out['figure']).stat().st_size > 0


def test_reconstructions_notebook_converts_an_official_release(runs):
  if 'release' not in runs:
    pytest.skip('the conversion needs torch (.[test])')
  run = runs['release']
  out, shown = run.result()
  assert shown == 2
  assert out['kind'] == 'full' and out['norm_pix'] and out['shape'] == [6, 32, 32, 3]
  assert not (run.root / 'runs' / 'mae_demo').exists()  # the release was used, no pretraining
  assert (pathlib.Path(out['converted_dir']) / 'params').is_dir()
  with np.load(run.root / 'converted.npz') as got, np.load(run.root / 'expected.npz') as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_pretrain_and_evaluate_notebook(runs):
  run = runs['pretrain_and_evaluate']
  out, shown = run.result()
  assert shown == 3  # the live plot (updated in place), the comparison, a curves.png
  assert {(n.split(' (')[0], i) for n, i, _ in out['results']} == {
      ('linear probe', 'MAE'), ('linear probe', 'random'), ('partial fine-tune', 'MAE'),
      ('partial fine-tune', 'random')}
  assert all(0 <= v <= 100 for _, _, v in out['results'])
  assert out['live_updates'] >= 1  # the live plot drew the pretraining's metrics
  pretrained = run.root / 'runs' / 'mae_demo'
  assert sorted(p.name for p in (pretrained / 'checkpoints').iterdir()) == ['2', '4']
  for workdir in out['workdirs']:
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    assert any('eval/top1' in r for r in records)
    assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 0
  from mae_jax.io import checkpoint  # pylint: disable=g-import-not-at-top
  _, probe_config = checkpoint.load_params(out['workdirs'][0])
  assert probe_config['classifier']['job'] == 'linear_probe'


def test_use_the_encoder_notebook(runs):
  import mae_jax  # pylint: disable=g-import-not-at-top
  from mae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  run = runs['use_the_encoder']
  out, shown = run.result()
  assert shown == 2  # the neighbours and the PCA
  assert out['feats'] == {e: {'cls': [72, 64], 'mean': [72, 64]} for e in ('pretrained', 'random')}
  assert out['coords'] == [[72, 2]] * 4
  assert out['labels'] == list(range(8))  # every photo's tiles
  assert all(0 <= v <= 1 for v in out['same_photo'])
  assert pathlib.Path(out['pca']).stat().st_size > 0
  assert not (run.root / 'runs' / 'mae_demo').exists()  # CHECKPOINT was used: no pretraining
  params, model_config = run.params
  tiles = pipeline.load_examples(pipeline.default_dataset_config(), split='test', indices=[0, 1],
                                 image_size=32)['image']
  expected = mae_jax.features(params, tiles, model_config, pool='cls')
  np.testing.assert_allclose(out['cls'], expected, rtol=1e-4, atol=1e-5)
