"""Every notebook in colab/ runs top to bottom without error (the tiny default, CPU, offline).

Each notebook is executed with nbclient in a fresh IPython kernel started from this test's own
interpreter (so the kernel imports the oel_jax under test), in an environment that forbids
hub downloads (``HF_HUB_OFFLINE=1``) and shows JAX a single CPU device, as on a Colab CPU
runtime. A cell that raises fails the test with the cell's source and the error. The committed
notebooks must carry no outputs (small diffs).

``learning_demo.ipynb`` runs the README's main job; here it is pointed (a cell after its
parameters) at the session's shortened demo run (`tiny_loop_run.short_demo`, whose learning
tests/test_demo.py checks), so its command resumes a finished run and the cells that read the
summary and show the plot run on real output.
"""

import glob
import json
import os
import re
import sys

import pytest

import tiny_loop_run

if os.environ.get("CI"):  # CI must run them: a missing test dependency is an error there
  import ipykernel  # noqa: F401  pylint: disable=unused-import
  import nbclient
  import nbformat
else:
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
CELL_TIMEOUT_S = 600  # per cell; a whole notebook takes about a minute on a 2-core CPU
KERNEL = "python3"


def _kernel_env(tmp_path):
  env = dict(os.environ)
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             JAX_PLATFORMS="cpu", IPYTHONDIR=str(tmp_path / "ipython"),
             HF_HOME=str(tmp_path / "hf"))
  # conftest.py simulates 8 CPU devices for the sharding tests; a notebook gets one, like Colab.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


@pytest.fixture
def kernelspec_dir(tmp_path, monkeypatch):
  """A "python3" kernelspec running this interpreter, found ahead of any installed one."""
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (oel_jax tests)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  return spec


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"oel_tiny_walkthrough.ipynb", "kl_loss.ipynb", "learning_demo.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.execution_count is None and not cell.outputs, (
          f"{os.path.basename(path)} cell {i} has outputs: clear them before committing")
  switch = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(switch) == 1 and 'MODEL = "tiny"' in switch[0].source, (
      f"{os.path.basename(path)}: one cell tagged 'parameters' must hold the switch "
      'MODEL = "tiny"')


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path, tmp_path_factory, kernelspec_dir):
  nb = nbformat.read(path, as_version=4)
  if os.path.basename(path) == "learning_demo.ipynb":
    run = tiny_loop_run.short_demo(tmp_path_factory)
    assert run.process.returncode == 0, run.process.stderr[-3000:]
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"WORKDIR = {run.workdir!r}\nARGS = {list(tiny_loop_run.SHORT_DEMO)!r}"))
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, allow_errors=False,
      resources={"metadata": {"path": str(workdir)}})
  failure = None
  try:
    client.execute(env=_kernel_env(tmp_path))
  except nbclient.exceptions.CellTimeoutError as e:
    failure = f"a cell ran over {CELL_TIMEOUT_S}s:\n{e}"
  except nbclient.exceptions.CellExecutionError as e:
    failure = "a cell failed:\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # no ANSI colours
  if failure:  # outside the except block: the report shows this message alone
    pytest.fail(f"{os.path.basename(path)}: {failure}", pytrace=False)
  ran = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in ran)
  # The install cell skipped pip (oel_jax is importable here) and printed nothing.
  install = [c for c in ran if "OEL_JAX_SOURCE" in c.source]
  assert len(install) == 1 and not install[0].outputs, install
