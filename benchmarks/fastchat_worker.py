"""FastChat 0.2.36's `fastchat.serve.model_worker`, run under transformers 5 (FastChat's own venv,
benchmarks/peers.py; this file imports nothing of pagedserve).

    python -P benchmarks/fastchat_worker.py [model_worker's flags]

(-P: without it benchmarks/ comes first on sys.path, and its kernels.py hides the `kernels`
package that transformers imports.)

One patch before the worker starts: FastChat reads the context length through
`config.rope_scaling["factor"]`, and transformers 5 gives every config a `rope_scaling` dict
(its rope parameters, with no "factor" for plain RoPE), so the worker dies with
KeyError: 'factor'. A missing factor means no scaling, 1, as it did before.
"""

import runpy

import fastchat.utils

SEQUENCE_LENGTH_KEYS = fastchat.utils.SEQUENCE_LENGTH_KEYS


def get_context_length(config) -> int:
    rope_scaling = getattr(config, "rope_scaling", None) or {}
    factor = rope_scaling.get("factor") or 1
    for key in SEQUENCE_LENGTH_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            return int(factor * value)
    return 2048


fastchat.utils.get_context_length = get_context_length  # before model_worker imports it

if __name__ == "__main__":
    runpy.run_module("fastchat.serve.model_worker", run_name="__main__", alter_sys=True)
