#!/usr/bin/env python
"""Benchmark: one full-size Merlin image forward, ours vs the official ``merlin-vlm`` package.

Full-size I3ResNet-152 (the published image encoder, 121.9 M parameters incl. both heads)
with seeded random weights, built by the package's own ``MerlinArchitecture`` in the
reference environment (``Testing/python/reference_packages.py``; Clinical-Longformer
replaced by a small Longformer, which the image path does not use), saved as the published
``.pt`` and loaded here with ``load_merlin``.  Input: one seeded 1 x 1 x 224 x 224 x 160
volume (Merlin's preprocessed size).  Prints seconds per forward (median of
``--repeats``, after one warm-up) for each and the max abs difference of the contrastive
image embedding, unnormalised and normalised.  CPU, all cores torch gives each process.

Not a test: ``python Testing/benchmarks/bench_merlin_forward.py [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE.parents[1] / "SlicerMedAlign"))

OFFICIAL_FORWARD = r"""
import statistics, time
repeats = int(sys.argv[4])
torch.manual_seed(3)
image = torch.rand(1, 1, 224, 224, 160)
i3 = model.encode_image.i3_resnet
times = []
with torch.no_grad():
    for i in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        contrastive, ehr = i3(image)
        times.append(time.perf_counter() - start)
save_file({"image": image, "contrastive": contrastive.contiguous()}, str(out_dir / "official_forward.safetensors"))
print(json.dumps({"seconds": statistics.median(times[1:]), "threads": torch.get_num_threads()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from reference_packages import run_reference
    from safetensors.torch import load_file
    from test_merlin_parity import OFFICIAL_BUILD, WEIGHTS_NAME, make_text_folder

    from medalign.models.merlin import load_merlin

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = make_text_folder(tmp / "text")
        stdout = run_reference(OFFICIAL_BUILD + OFFICIAL_FORWARD, text, tmp, WEIGHTS_NAME, str(args.repeats), timeout=3600)
        official = json.loads(stdout.strip().splitlines()[-1])
        ref = load_file(str(tmp / "official_forward.safetensors"))
        model = load_merlin(tmp / WEIGHTS_NAME, text, "cpu")
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                latent = model.image_features(ref["image"]).global_latent
                times.append(time.perf_counter() - start)
        want = ref["contrastive"]
        result = {
            "input": [1, 1, 224, 224, 160],
            "official_s": round(official["seconds"], 2),
            "ours_s": round(statistics.median(times[1:]), 2),
            "threads": torch.get_num_threads(),
            "max_abs_diff_embedding": float((latent - want).abs().max()),
            "max_abs_diff_normalised": float((F.normalize(latent, dim=-1) - F.normalize(want, dim=-1)).abs().max()),
            "embedding_max_abs": float(want.abs().max()),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
