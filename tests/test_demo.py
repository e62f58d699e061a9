"""The README's main job is the learning demo, and the loop measurably improves its model.

One run of ``python -m oel_jax.main`` with the default config (``configs/demo.py``): two OEL
rounds of the packaged demo model on lake Ossa, whose controls it never saw. The held-out pass
rate without knowledge must rise by `MARGIN` from the initial model to the last round. The
margin was chosen so that a broken run does not reach it; each of these was tried by hand
(numbers in docs/benchmarks.md, "Learning demo"):

- a broken loss (the student's gradient stopped, or the divergence's sign flipped);
- a stale teacher (the teacher's prompt without the knowledge);
- a sampler that ignores the weight swap (`Sampler.update_weights` doing nothing), so that
  every round plays and is evaluated with the initial weights.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tiny_loop_run import ROOT, main_env

MARGIN = 0.25
"""Least rise of the held-out pass rate (initial -> last round) the test accepts."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  start = time.perf_counter()
  process = subprocess.run([sys.executable, "-m", "oel_jax.main", f"--workdir={workdir}"],
                           cwd=ROOT, env=main_env(), capture_output=True, text=True,
                           timeout=1200)
  return workdir, process, time.perf_counter() - start


def test_readme_main_job_runs_the_demo_and_prints_its_results(demo):
  workdir, process, seconds = demo
  assert process.returncode == 0, process.stderr[-3000:]
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert re.findall(r"```bash\n(.+?)\n```", readme)[0].endswith("python -m oel_jax.main")
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["name"] == "demo" and config["env_settings"] == {
      "controls": "left,right,up,down", "lake": "Ossa", "num_holes": 0}
  rounds = re.findall(r"^  (initial|round \d): pass rate (\d\.\d{3})", process.stdout, re.M)
  assert [r for r, _ in rounds] == ["initial", "round 0", "round 1"], process.stdout
  assert f"plot: {os.path.join(workdir, 'plots', 'rounds.png')}" in process.stdout
  assert os.path.getsize(os.path.join(workdir, "plots", "rounds.png")) > 10_000
  assert seconds < 600, f"the demo took {seconds:.0f}s"


def test_the_loop_raises_the_held_out_pass_rate(demo):
  workdir, process, _ = demo
  assert process.returncode == 0, process.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    evaluations = json.load(f)["evaluations"]
  assert [e["round"] for e in evaluations] == ["initial", 0, 1]
  first, last = evaluations[0]["pass_rate"], evaluations[-1]["pass_rate"]
  assert last - first >= MARGIN, evaluations
  # The knowledge it wrote itself is what the weights learn: in context it helps at once.
  assert evaluations[1]["in_context_pass_rate"] - first >= MARGIN, evaluations


def test_the_packaged_model_loads_with_load_hf_and_transformers_alike():
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from oel_jax import chat  # pylint: disable=import-outside-toplevel
  from oel_jax.demo import demo_model_path  # pylint: disable=import-outside-toplevel
  from oel_jax.envs import make_env  # pylint: disable=import-outside-toplevel
  from oel_jax.models import load_hf  # pylint: disable=import-outside-toplevel

  path = demo_model_path()
  with open(os.path.join(path, "build_info.json")) as f:
    info = json.load(f)
  assert info["script"] == "scripts/build_demo_model.py"
  assert info["curriculum"]["demo_controls"] == "left,right,up,down"
  tokenizer = chat.load_tokenizer(path)
  prompt = make_env("frozenlake", seed=1, controls="left,right,up,down", lake="Ossa",
                    num_holes=0).reset()
  ids = np.asarray([chat.encode_chat(tokenizer, [{"role": "user", "content": prompt}],
                                     enable_thinking=False)])
  ours = np.asarray(load_hf(path)(ids))[0, -1]
  hf = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits[0, -1].numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=2e-3)
  # It answers in its format: "I move <direction>: [<key>]".
  assert tokenizer.decode([int(np.argmax(ours))]).strip() == "I"
