"""benchmarks/serving.py against a real worker (tiny random Llama): a few streamed requests, and
the JSON it writes holds sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from servers import worker_process

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_serving_benchmark_counts_every_request_and_token(tiny_llama: Path, tmp_path: Path) -> None:
    with worker_process(
        tmp_path, tiny_llama, None, model_names="bench", kv_cache_memory=16 << 20, max_model_len=512
    ).start() as w:
        out = tmp_path / "serving.json"
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.serving", "--base-url", w.url, "--model", "bench",
             "--tokenizer", str(tiny_llama), "--dataset", "random", "--num-prompts", "8",
             "--input-len", "8:40", "--output-len", "12", "--request-rate", "50",
             "--slo", "ttft:60000", "--no-progress", "--json", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=100,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    (run,) = report["runs"].values()
    assert run["completed"] == 8 and run["failed"] == 0
    assert run["output_tokens"] == 8 * 12  # ignore_eos: every answer is max_tokens long
    assert run["input_tokens"] == report["workload"]["prompt_tokens"]
    assert 0 < run["median_ttft_ms"] <= run["median_e2el_ms"]
    assert run["p99_ttft_ms"] <= run["p99_e2el_ms"]
    assert run["mean_tpot_ms"] > 0 and run["median_itl_ms"] > 0
    assert run["output_throughput"] == pytest.approx(96 / run["duration_s"])
    assert run["good_requests"] == 8
