"""The AdapterHub reference for tests/test_bottleneck.py: the real `adapters` library (1.3.0, transformers 4.57),
run with ``.venv-adapters/bin/python`` as ONE subprocess per test module (importing torch + transformers costs
~10 s), so it handles every case of a module in one go.

Usage: ``python tests/adapters_ref.py SPEC.json OUT_DIR``. SPEC: ``{"tokens": [[int]], "mask": [[0|1]],
"cases": [case, ...]}``; each case builds the Hugging Face model of ``model_dir`` (a directory jlora wrote), calls
``adapters.init(model)`` and then

* ``"op": "load"``: loads the jlora-written adapter ``adapter_dir`` (``use_safetensors=True``) and activates it;
* ``"op": "make"``: adds an adapter ``name`` with ``config`` (``{"preset": <AdapterHub config string>,
  **overrides}``), draws non-identity random weights (seed ``seed``) and saves it to ``save_dir``
  (``use_safetensors``: safetensors, else AdapterHub's default ``pytorch_adapter.bin``), with the head files
  AdapterHub writes by default;
* ``"op": "base"``: no adapter.

Writes ``OUT_DIR/<id>.npy`` (float32 logits ``[B, T, vocab]`` of the tokens under the attention mask) and
``OUT_DIR/results.json`` (``{id: {"missing_keys", "unexpected_keys", "files", "adapter_config"}}``). An exception
in a case is recorded as ``{"error": "..."}`` for that case.
"""

import json
import os
import sys
import traceback
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore")
import adapters  # noqa: E402
import transformers  # noqa: E402
from adapters import AdapterConfig  # noqa: E402


def run_case(case, tokens, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(case["model_dir"], dtype=torch.float32).eval()
    adapters.init(model)
    info = {}
    if case["op"] == "load":
        loading = {}
        name = model.load_adapter(case["adapter_dir"], use_safetensors=True, set_active=True, loading_info=loading)
        info.update(missing_keys=list(loading.get("missing_keys", [])),
                    unexpected_keys=list(loading.get("unexpected_keys", [])), name=name)
    elif case["op"] == "make":
        conf = dict(case["config"])
        config = AdapterConfig.load(conf.pop("preset"), **conf)
        name = case["name"]
        model.add_adapter(name, config=config, set_active=True)
        gen = torch.Generator().manual_seed(case.get("seed", 0))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".adapters.{name}." in pname:  # trained-looking weights: far from any init
                    p.add_(case.get("noise", 0.2) * torch.randn(p.shape, generator=gen))
        model.eval()
        model.save_adapter(case["save_dir"], name, use_safetensors=case.get("use_safetensors", False))
        info["files"] = sorted(os.listdir(case["save_dir"]))
        with open(os.path.join(case["save_dir"], "adapter_config.json")) as f:
            info["adapter_config"] = json.load(f)
    elif case["op"] != "base":
        raise ValueError(f"unknown op {case['op']!r}")
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask).logits.float().numpy()
    return logits, info


def main():
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    mask = torch.tensor(spec["mask"], dtype=torch.long)
    os.makedirs(out_dir, exist_ok=True)
    results = {"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                            "torch": torch.__version__}}
    for case in spec["cases"]:
        try:
            logits, info = run_case(case, tokens, mask)
            np.save(os.path.join(out_dir, f"{case['id']}.npy"), logits)
            results[case["id"]] = info
        except Exception:  # recorded for the test to report
            results[case["id"]] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
