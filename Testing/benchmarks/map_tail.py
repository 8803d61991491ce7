"""Where is a finding's case decision lost?  Compares each positive phantom's best lesion
token with the lesion-free tissue tokens of the same scan, on the model's own map.

A case score is close to the map's maximum, so a lesion token that outranks 99% of the
normal tokens still loses the case when a scan has a few thousand of them.  Printed for a
cohort with lesion masks (``medalign phantoms`` output):

- lesion-free tissue tokens: median margin (present-minus-absent logit) and the share that
  says "present" — a location prior where the finding usually sits;
- per positive phantom: the share of tissue tokens above the lesion's best token, the lesion's
  best minus the tissue maximum, and how often the lesion wins the maximum.

Tissue tokens: at least half of their voxels lie within ``--tissue-hu`` (default: lung
parenchyma), lesion tokens excluded.  Unlike ``small_lesion_probe.py``'s widened mean-HU rule
this leaves out the air around the body, which would swamp the medians.

    python Testing/benchmarks/map_tail.py --data work/val --cases 40
    python Testing/benchmarks/map_tail.py --data work/val --finding Lymphadenopathy --tissue-hu -200 150

Measured for the model card (demo model version 5, first 40 generator-1.1 validation
phantoms, lung nodule, 1 minute on 2 cores): see its section "Where the small findings' case
decision is lost".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medalign.core.volume_io import read_volume
from medalign.data.cohorts import load_cohort
from medalign.data.labels import resolve_labels
from medalign.inference.preprocess import hu_to_model_value, prepare
from medalign.inference.screener import Screener
from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.training.prepared import token_mask


def token_margins(screener: Screener, finding: str, volume) -> tuple[torch.Tensor, object]:
    """(X', Y', Z') present-minus-absent token logits of ``finding`` and the prepared grid."""
    model = screener.model
    prompts = screener.prompts[screener.findings.index(finding)]
    prepared = prepare(volume, model.profile, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model.token_logits(model.image_features(model.input_from_grid(prepared.tensor)), prompts.ensemble)[0]
    return logits[0] - logits[1], prepared


def tissue_tokens(image: torch.Tensor, tissue_hu: tuple[float, float], profile, stride: int) -> torch.Tensor:
    """(X', Y', Z') tokens at least half of whose voxels (channel 0) lie within ``tissue_hu``."""
    lo, hi = (hu_to_model_value(v, profile) for v in tissue_hu)
    inside = ((image[0] > lo) & (image[0] < hi)).float()
    return torch.nn.functional.avg_pool3d(inside[None, None], stride)[0, 0] >= 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a phantom cohort with masks")
    ap.add_argument("--model", default=None, help="registered model name (default: the embedded demo model)")
    ap.add_argument("--finding", default="Lung nodule")
    ap.add_argument("--tissue-hu", type=float, nargs=2, default=(-950.0, -500.0))
    ap.add_argument("--cases", type=int, default=40, help="the first N cases")
    args = ap.parse_args()
    screener = Screener(model=args.model, findings=[args.finding], device="cpu")
    cases = load_cohort(args.data)[: args.cases]
    labels = resolve_labels(cases, [args.finding]).numpy()[:, 0]
    bit = 1 << CT_RATE_FINDINGS.index(args.finding)
    profile, stride = screener.model.profile, screener.model.patch_size[0]
    medians, shares_present, above, gaps = [], [], [], []
    for case, label in zip(cases, labels):
        margin, prepared = token_margins(screener, args.finding, read_volume(case.volume_path))
        lesion = (token_mask(read_volume(case.mask_path), prepared.grid_to_ras, profile.size, stride) & bit) != 0
        free = tissue_tokens(prepared.tensor[0].float(), tuple(args.tissue_hu), profile, stride) & ~lesion
        medians.append(float(margin[free].median()))
        shares_present.append(float((margin[free] > 0).float().mean()))
        if label == 1 and lesion.any():
            best = margin[lesion].max()
            above.append(float((margin[free] > best).float().mean()))
            gaps.append(float(best - margin[free].max()))
    print(f"{args.finding}, {len(cases)} cases of {args.data}, model {screener.model_name}")
    print(f"  lesion-free tissue tokens: median margin {np.median(medians):.2f} (per-case medians "
          f"{np.percentile(medians, 10):.2f} to {np.percentile(medians, 90):.2f}); share saying present "
          f"{np.mean(shares_present):.2f}")
    if gaps:
        print(f"  {len(gaps)} positive cases: share of tissue tokens above the lesion's best token, median "
              f"{np.median(above):.4f}; lesion best minus tissue maximum, median {np.median(gaps):.2f}; "
              f"the lesion wins the maximum in {np.mean(np.array(gaps) > 0):.2f}")


if __name__ == "__main__":
    main()
