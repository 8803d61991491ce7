#!/usr/bin/env python
"""Benchmark: one full-size COLIPRI image forward, ours vs the official ``colipri`` package.

The official package (in the reference venv, see ``Testing/python/reference_packages.py``)
builds its default model (Primus-M: 864 wide, 16 blocks, 12 heads, 192³ input, 24³ tokens;
projector to 768; attention pooling; a BERT of CXR-BERT's size) with random weights,
saves it with its own ``save_weights`` (the published ``model.safetensors`` layout) and times
``encode_image`` on one random 1 x 1 x 192³ volume, pooled (``project=True, pool=True,
normalize=True``, the zero-shot path); its dense patches (``project=True, pool=False``) are
computed from that pass's backbone output with the official projector and ``to_dense``.  We
load the same file with ``load_colipri`` and time one ``image_outputs`` call (both outputs).

Prints seconds for each side and the max abs differences.  Not a test (minutes on a CPU):
``python Testing/benchmarks/bench_colipri_forward.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "python"))
sys.path.insert(0, str(REPO / "SlicerMedAlign"))

REFERENCE = r'''
import json, sys, time
from pathlib import Path

import torch
from hydra.utils import instantiate
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from colipri.checkpoint import load_model_config
from colipri.model.multimodal import Model
from colipri.model.text import TextEncoder

out, threads = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
config = load_model_config()
bert = BertModel(BertConfig(), add_pooling_layer=False)
model = Model(instantiate(config.image_encoder), TextEncoder(bert, instantiate(config.text_encoder.pooler))).eval()
model.softmax_temperature = torch.tensor(0.05)
model.save_weights(out / "model.safetensors")
image = torch.randn(1, 1, 192, 192, 192)
captured = {}
model.image_encoder.backbone.register_forward_hook(lambda module, args, output: captured.update(patches=output))
with torch.inference_mode():
    start = time.perf_counter()
    pooled = model.encode_image(image, project=True, pool=True, normalize=True)  # the zero-shot path
    seconds = time.perf_counter() - start
    # encode_image(project=True, pool=False) on the same backbone output, without a second pass
    dense = model.image_encoder.pooler.to_dense()(model.image_encoder.projector(captured["patches"]))
print(json.dumps({"seconds": seconds}), file=sys.stderr)  # kept even if saving fails
save_file({k: v.contiguous() for k, v in {"image": image, "pooled": pooled, "dense": dense}.items()},
          str(out / "reference.safetensors"))
print(json.dumps({"seconds": seconds}))
'''


def main(argv: list[str] | None = None) -> None:
    import torch
    from reference_packages import run_reference
    from safetensors.torch import load_file
    from transformers import BertConfig

    from medalign.models.colipri import load_colipri

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        official = json.loads(run_reference(REFERENCE, root, args.threads, timeout=3600).strip().splitlines()[-1])
        folder = root / "cxr-bert"
        BertConfig().save_pretrained(str(folder))
        model = load_colipri(root / "model.safetensors", folder)
        ref = load_file(str(root / "reference.safetensors"))
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.image_outputs(ref["image"])  # backbone, projector, pooled and dense in one pass
            seconds = time.perf_counter() - start
        pooled = torch.nn.functional.normalize(out["pooled"], dim=1)
        report = {
            "threads": args.threads,
            "official_s": round(official["seconds"], 1),
            "ours_s": round(seconds, 1),
            "max_abs_diff_pooled": float((pooled - ref["pooled"]).abs().max()),
            "max_abs_diff_dense": float((out["dense"] - ref["dense"]).abs().max()),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
