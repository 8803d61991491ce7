#!/usr/bin/env python
"""Benchmark: CT-CLIP screening of the 18 CT-RATE findings, encode-once vs the reference loop.

Full-size CT-CLIP (CTViT 512-d 4+4 layers, codebook 8192, 480x480x240 input; a BERT of
CXR-BERT's size: 768 wide, 12 layers, with a small vocabulary) with random weights, one
synthetic chest-like volume.

* ``ours``: encode the image once, encode all 36 prompts once (padded to the longest),
  then per finding a softmax over ("X is present.", "X is not present.") and its exact
  token map (``token_logits``).
* ``reference``: what CT-CLIP's ``zero_shot.py`` does per finding: tokenise the two
  prompts padded to 512 tokens, re-encode the image and the prompts, softmax.  It is run
  through this project's implementation (same arithmetic as the reference code, same
  kernels), on ``--reference-findings`` findings, and its per-finding median is
  multiplied by 18, which the output says.

Each approach runs in its own process so peak memory is measured separately (Linux
VmHWM, reset after the model is built; CUDA: max_memory_allocated).  Not a test:
``python Testing/benchmarks/bench_ctclip_screening.py [--repeats 3] [--reference-findings 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINDINGS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]


# ----------------------------------------------------------------------------- memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the peak covers inference only."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_gb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 2**20 if kb is not None else float("nan")


def _peak_gb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20


# ----------------------------------------------------------------------------- model and data


def build_model(device: str):
    """Full-size CT-CLIP with seeded random weights and a small-vocabulary CXR-BERT-sized BERT."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from medalign.models.ctclip import CTCLIPConfig, CTCLIPModel
    from medalign.models.ctvit import CTViTConfig

    words = sorted({w.lower() for f in FINDINGS for w in f.split()} | {"is", "not", "present", "."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer(str(Path(tmp) / "vocab.txt"), do_lower_case=True)
    bert_cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512,
    )
    bert_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    config = CTCLIPConfig(vision=CTViTConfig(), token_hw=(24, 24), dim_latent=512, dim_text=768)
    model = CTCLIPModel(config, BertModel(bert_cfg), tokenizer)
    with torch.no_grad():
        model.visual_transformer.vq._codebook.embed.normal_()
        model.temperature.fill_(4.6)
    return model.to(device).eval()


def phantom(device: str, depth: int):
    """A deterministic chest-like native tensor (1, 1, D, 480, 480), HU/1000 in [-1, 1]."""
    import torch

    z = torch.linspace(-1, 1, depth, device=device).view(-1, 1, 1)
    x = torch.linspace(-1, 1, 480, device=device).view(1, -1, 1)
    y = torch.linspace(-1, 1, 480, device=device).view(1, 1, -1)
    body = ((x / 0.85) ** 2 + (y / 0.65) ** 2) < 1
    lungs = (((x.abs() - 0.38) / 0.28) ** 2 + (y / 0.45) ** 2 + (z / 1.1) ** 2) < 1
    img = torch.full((depth, 480, 480), -1.0, device=device)
    img = torch.where(body, 0.04 + 0.02 * torch.sin(9 * x + 5 * y + 3 * z), img)
    img = torch.where(lungs, -0.85 + 0.03 * torch.cos(20 * x * y + 4 * z), img)
    return img.unsqueeze(0).unsqueeze(0).contiguous()


# ----------------------------------------------------------------------------- one approach


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(model, image, device: str) -> dict:
    import torch

    prompts = [t.format(finding=f) for f in FINDINGS for t in ("{finding} is present.", "{finding} is not present.")]
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        feats = model.image_features(image)
        _sync(device)
        t1 = time.perf_counter()
        text = model.text_latents(prompts)
        _sync(device)
        t2 = time.perf_counter()
        probs, maps = [], []
        for i in range(len(FINDINGS)):
            pair = text[2 * i : 2 * i + 2]
            probs.append(float(model.logits(feats, pair)[0].softmax(dim=0)[0]))
            tl = model.token_logits(feats, pair)[0]
            maps.append((tl[0] - tl[1]).cpu())
        _sync(device)
        t3 = time.perf_counter()
    return {"total_s": t3 - t0, "encode_s": t1 - t0, "text_s": t2 - t1, "score_and_maps_s": t3 - t2, "maps": len(maps)}


def run_reference_finding(model, image, finding: str, device: str) -> float:
    import torch

    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        tokens = model.tokenize([f"{finding} is present.", f"{finding} is not present."], padding="max_length")
        image_latent = model.encode_image(image)  # re-encoded for every finding, as zero_shot.py does
        text_latent = model.encode_text(**tokens)
        float((model.logit_scale * image_latent @ text_latent.T)[0].softmax(dim=0)[0])
    _sync(device)
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args.device)
    image = phantom(args.device, args.depth)
    build_s = time.perf_counter() - t0
    rss_model = _rss_gb()
    reset_ok = _reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"mode": args.child, "build_s": build_s, "rss_after_build_gb": rss_model, "peak_reset": reset_ok,
                 "threads": torch.get_num_threads(), "device": args.device}
    if args.child == "ours":
        for _ in range(args.warmup):
            run_ours(model, image, args.device)
        out["runs"] = [run_ours(model, image, args.device) for _ in range(args.repeats)]
    else:
        names = FINDINGS[: args.reference_findings]
        for _ in range(args.warmup):
            run_reference_finding(model, image, names[0], args.device)
        out["per_finding_s"] = [run_reference_finding(model, image, f, args.device) for f in names]
    out["peak_rss_gb"] = _peak_gb()
    if args.device.startswith("cuda"):
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ----------------------------------------------------------------------------- driver


def _spawn(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--repeats", str(args.repeats),
           "--reference-findings", str(args.reference_findings), "--warmup", str(args.warmup),
           "--depth", str(args.depth), "--device", args.device, "--threads", str(args.threads)]
    print(f"[{mode}] running ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the '{mode}' run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the encode-once pipeline")
    parser.add_argument("--reference-findings", type=int, default=3, help="findings timed with the reference loop (x18 extrapolated)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (each approach)")
    parser.add_argument("--depth", type=int, default=240, help="slices (multiple of 10; CT-CLIP uses 240)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_findings < 1 or args.repeats < 1 or args.depth % 10:
        parser.error("--repeats and --reference-findings must be >= 1 and --depth a multiple of 10")
    if args.child:
        print(json.dumps(child(args)))
        return 0

    ours = _spawn("ours", args)
    ref = _spawn("reference", args)
    totals = [r["total_s"] for r in ours["runs"]]
    ours_med = statistics.median(totals)
    per = statistics.median(ref["per_finding_s"])
    n_ref = len(ref["per_finding_s"])
    ref_18 = per * len(FINDINGS)
    extrapolated = n_ref < len(FINDINGS)
    part = {k: statistics.median(r[k] for r in ours["runs"]) for k in ("encode_s", "text_s", "score_and_maps_s")}

    print(f"\nCT-CLIP full size, 1 x 1 x {args.depth} x 480 x 480, device {args.device}, torch threads {ours['threads']}")
    print(f"encode-once, 18 findings with maps: median {ours_med:.1f} s over {len(totals)} runs "
          f"({', '.join(f'{t:.1f}' for t in totals)}); image {part['encode_s']:.1f} s, 36 prompts {part['text_s']:.2f} s, "
          f"scores+maps {part['score_and_maps_s']:.2f} s")
    print(f"reference loop: median {per:.1f} s per finding over {n_ref} findings "
          f"({', '.join(f'{t:.1f}' for t in ref['per_finding_s'])}); 18 findings "
          f"{'EXTRAPOLATED (x18)' if extrapolated else 'measured'}: {ref_18:.1f} s, without maps")
    print(f"speed-up: {ref_18 / ours_med:.1f}x")
    for name, res in (("encode-once", ours), ("reference", ref)):
        extra = f", CUDA peak {res['cuda_peak_gb']:.2f} GiB" if "cuda_peak_gb" in res else ""
        print(f"memory {name}: RSS after model build {res['rss_after_build_gb']:.2f} GiB, peak during runs "
              f"{res['peak_rss_gb']:.2f} GiB{'' if res['peak_reset'] else ' (peak includes the build)'}{extra}")
    if args.json:
        result = {"ours": ours, "reference": ref, "ours_median_s": ours_med, "reference_per_finding_median_s": per,
                  "reference_18_s": ref_18, "reference_extrapolated": extrapolated, "speedup": ref_18 / ours_med}
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
