"""Processes started from the checkout's root, as users and the project start them (`python -m`,
`python -c`, Ray actors inheriting the working directory), have the root on `sys.path`. None of
the root's folders may then hide an installed distribution: `transformers` imports Hugging
Face's `kernels`, and the project has a `kernels/` folder."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(importlib.metadata.distribution("kernels").locate_file("")).resolve()
TOP_LEVEL = [p for p in sorted(ROOT.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def run_from_root(code: str, timeout: float = 180) -> dict:
    """Run `code` with `python -c` in the root (so the root is on its path); its last stdout line
    is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_top_level_folder_is_a_regular_package():
    """A folder without `__init__.py` is a PEP 420 namespace portion, which loses to a regular
    package of the same name anywhere on the path: no future release can be hidden by it."""
    regular = [p.name for p in TOP_LEVEL if (p / "__init__.py").exists()]
    assert regular == [], f"top-level folders with an __init__.py: {regular}"


def test_installed_distributions_win_over_the_root_folders():
    names = json.dumps([p.name for p in TOP_LEVEL])
    found = run_from_root(
        "import importlib.metadata as md, importlib.util as u, json, sys\n"
        f"assert sys.path[0] == '', sys.path[:3]\n"
        "dists = md.packages_distributions()\n"
        f"print(json.dumps({{n: u.find_spec(n).origin for n in {names} if n in dists}}))"
    )
    assert "kernels" in found  # the case that broke: transformers depends on it
    for name, origin in found.items():
        assert origin and Path(origin).resolve().is_relative_to(SITE), (name, origin)


def test_a_child_in_the_root_loads_a_model_through_transformers(tiny_llama: Path):
    loaded = run_from_root(
        "import json, kernels, transformers\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(tiny_llama)!r})\n"
        "print(json.dumps({'kernels': kernels.__file__, 'model': type(model).__name__}))"
    )
    assert Path(loaded["kernels"]).resolve().is_relative_to(SITE)
    assert loaded["model"] == "LlamaForCausalLM"


@pytest.mark.timeout(300)
def test_a_ray_actor_of_a_driver_in_the_root_loads_a_model_through_transformers(tiny_llama: Path):
    loaded = run_from_root(
        "import json, logging, os, ray\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False,\n"
        "         logging_level=logging.WARNING)\n"
        "@ray.remote(num_cpus=1)\n"
        "class Loader:\n"
        "    def load(self, path):\n"
        "        import kernels, sys, transformers\n"
        "        model = transformers.AutoModelForCausalLM.from_pretrained(path)\n"
        "        return {'kernels': kernels.__file__, 'model': type(model).__name__,\n"
        "                'cwd': os.getcwd(), 'path': sys.path}\n"
        f"print(json.dumps(ray.get(Loader.remote().load.remote({str(tiny_llama)!r}))))\n"
        "ray.shutdown()",
        timeout=280,
    )
    # The actor runs where the driver ran, with the root on its path: the case to guard.
    assert Path(loaded["cwd"]).resolve() == ROOT
    assert Path(loaded["kernels"]).resolve().is_relative_to(SITE)
    assert loaded["model"] == "LlamaForCausalLM"


@pytest.mark.timeout(600)
def test_the_readme_benchmark_commands_run_from_the_root(tmp_path: Path):
    """`python -m benchmarks.throughput` as the README gives it, on a small workload."""
    out = tmp_path / "throughput.json"
    argv = [
        sys.executable, "-m", "benchmarks.throughput", "--num-prompts", "4",
        "--min-prompt-len", "8", "--max-prompt-len", "16", "--output-len", "4",
        "--hidden", "64", "--layers", "2", "--heads", "4", "--intermediate", "128",
        "--vocab", "1024", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert runs["llama"]["pagedserve"]["tokens_per_s"] > 0, runs
