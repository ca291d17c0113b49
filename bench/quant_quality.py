"""Perplexity of quantized bases vs float32 on held-out text: what NF4 / FP4 / int8 (and the GGUF's own
quantization kept in memory) cost in quality, and the bytes each base tree occupies.

    python bench/quant_quality.py                          # the built-in SmolLM2-135M-Instruct GGUF
    python bench/quant_quality.py --model DIR_OR_GGUF --text FILE --quants fp32,nf4,int8,gguf

The text (default: the GPL-3 licence text Debian ships, English prose no model was tuned on here; else this
repository's README) is cut into --seq-token windows; perplexity = exp(mean next-token loss) over all of them.
The float32 model is the reference: for a GGUF file it is the file dequantized (its Q4_1/Q8_0 error is already
in it), so each quantization's delta is on top of that. ``gguf`` keeps the file's blocks quantized in memory
(`load_pretrained(quantize="gguf")`) and should equal fp32's perplexity up to rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _tree_bytes(params) -> int:
    import jax

    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(params))


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora.model_path import find_default_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--quants", default="fp32,nf4,fp4,int8,gguf")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model = a.model or find_default_model()
    text_path = a.text or next(f for f in ("/usr/share/common-licenses/GPL-3",
                                           os.path.join(os.path.dirname(__file__), "..", "README.md"))
                               if os.path.exists(f))
    tok = jlora.load_tokenizer(model)
    ids = tok.encode(open(text_path, encoding="utf-8").read(), add_special_tokens=False)
    n = min(a.windows, len(ids) // (a.seq + 1))
    x = np.asarray(ids[:n * (a.seq + 1)], np.int32).reshape(n, a.seq + 1)

    rows = []
    for q in a.quants.split(","):
        quantize = None if q == "fp32" else q
        if q == "gguf" and not model.endswith(".gguf"):
            continue
        try:
            t0 = time.perf_counter()
            cfg, params = jlora.load_pretrained(model, quantize=quantize)
            load_s = time.perf_counter() - t0
        except (ValueError, TypeError) as e:
            print(f"{q}: skipped ({e})", file=sys.stderr)
            continue
        logits = jlora.apply(cfg, params, jnp.asarray(x[:, :-1]))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(x[:, 1:])[..., None], axis=-1))[..., 0]
        rows.append({"quant": q, "ppl": math.exp(float(nll.mean())), "nll": float(nll.mean()),
                     "tree_mb": _tree_bytes(params) / 2**20, "load_s": load_s, "tokens": int(nll.size)})
        del params
    ref = next((r for r in rows if r["quant"] == "fp32"), None)
    print(f"model={os.path.basename(model)} text={os.path.basename(text_path)} tokens={rows[0]['tokens'] if rows else 0}")
    for r in rows:
        d = f"  Δppl {r['ppl'] - ref['ppl']:+.3f} ({100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%)" if ref else ""
        print(f"{r['quant']:>5}: ppl {r['ppl']:8.3f}{d}  base tree {r['tree_mb']:7.1f} MB  load {r['load_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
