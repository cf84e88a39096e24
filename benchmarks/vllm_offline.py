"""vLLM's offline `LLM.generate` on a workload of token-id prompts, for benchmarks/throughput.py.

    VENV_PYTHON benchmarks/vllm_offline.py WORKLOAD.json

Runs in vLLM's own venv (benchmarks/peers.py) and imports vllm only, never pagedserve.
WORKLOAD.json: {"model", "dtype", "prompts": [[ids]], "output_len", "max_num_seqs",
"max_model_len", "seed"}. The model is loaded and warmed up (one short generate), then each line
read from stdin ("run") times one `generate` of every prompt, greedy, exactly `output_len`
tokens each (EOS ignored), and answers one JSON line: seconds, output_tokens (counted from what
vLLM returned), tokens_per_s, and the output token ids. The first answer line is {"ready": ...}.

Answers go to the stdout this process was started with; everything else writing to stdout
(vLLM's logs, its engine and worker processes, C++ prints) is sent to stderr instead."""

import json
import os
import sys
import time


def main() -> None:
    # The script's folder holds benchmarks/kernels.py, which would shadow the `kernels`
    # package that transformers probes for on import.
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(__file__)]
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # children inherit it: their logs go to stderr too
    sys.stdout = sys.stderr

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1]) as f:
        work = json.load(f)
    start = time.perf_counter()
    llm = LLM(
        model=work["model"], dtype=work["dtype"], max_num_seqs=work["max_num_seqs"],
        max_model_len=work["max_model_len"], enable_prefix_caching=False,
        seed=work["seed"],
    )  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=p) for p in work["prompts"]]
    n = work["output_len"]
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], warm, use_tqdm=False)
    answers.write(json.dumps({"ready": True, "load_s": time.perf_counter() - start}) + "\n")
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        generated = sum(map(len, tokens))
        answers.write(json.dumps({
            "seconds": seconds, "output_tokens": generated,
            "tokens_per_s": generated / seconds, "token_ids": tokens,
        }) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
