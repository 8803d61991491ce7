"""``medalign screen``: one CT in, ranked findings + alignment maps out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medalign.cli.options import FINDINGS_HELP, add_adapter_argument, add_device_argument, add_tta_argument
from medalign.core.progress import ProgressReporter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "screen",
        help="screen one CT volume for abnormalities (zero-shot) and write maps",
        description="Screen a CT (NIfTI, NRRD, MHA or a DICOM folder) for findings; writes "
        "results.json, results.csv and one alignment map per finding under --out.",
    )
    p.add_argument("input", nargs="?", help="CT file or DICOM folder (omit with --sample)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; locked while the run writes)")
    p.add_argument("--model", default=None, help="registry model name (default: medalign-demo)")
    p.add_argument("--findings", default=None, help=FINDINGS_HELP)
    add_device_argument(p)
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bf16", "fp16"])
    p.add_argument("--no-maps", action="store_true", help="skip the alignment maps (faster)")
    add_tta_argument(p)
    p.add_argument("--report", action="store_true",
                   help="also write the structured report (report.json, report.csv, report.html): per finding its "
                   "definition, appearance on CT, where the map points and the verdict")
    p.add_argument("--segmentation", type=Path, default=None, metavar="LABELMAP",
                   help="a labelmap of the scan (e.g. TotalSegmentator's) so the report names the structure under "
                   "each hotspot; needs --segmentation-labels")
    p.add_argument("--segmentation-labels", type=Path, default=None, metavar="TABLE",
                   help='the labelmap\'s label names, one "value name" per line (a Slicer colour table works)')
    add_adapter_argument(p)
    p.add_argument("--sample", action="store_true", help="screen a generated sample chest CT (no data needed)")
    p.add_argument("--progress-lines", action="store_true", help="machine-readable progress lines (for the Slicer module)")
    p.set_defaults(func=run)


def _sample_volume(out: Path):
    """A synthetic chest CT with a few findings, so a fresh install can try the tool at once."""
    from medalign.core.volume_io import write_volume
    from medalign.synth.phantoms import sample_chest_ct

    phantom = sample_chest_ct()
    path = write_volume(phantom.volume, out / "sample_chest_ct.nii.gz")
    phantom.volume.metadata.update(path=str(path), format="nifti")
    return phantom.volume, path


def run(args: argparse.Namespace) -> int:
    from medalign.core.output_folder import claim

    with claim(args.out) as out:  # a file, read-only folder or /proc fails here, before any work
        segmentation = _segmentation(args)  # a bad labelmap fails before the screening
        result, source = _screen(args, out)
        result.write(out)
        if args.report:
            from medalign.inference.report import write_report

            write_report(result, out, segmentation)
    if not args.progress_lines:
        print_table(result, sys.stdout)
        print(f"\nWrote {out / 'results.json'}, {out / 'results.csv'}" + ("" if args.no_maps else f" and {out / 'maps'}/"))
        if args.sample:
            from medalign.synth.phantoms import SAMPLE_FINDINGS

            print(f"This was a generated sample ({source}) containing {', '.join(SAMPLE_FINDINGS).lower()}.\n"
                  f"Screen your own scan with:\n"
                  f"  medalign screen /path/to/ct.nii.gz --out results   (NIfTI, NRRD, MHA or a DICOM folder)")
    return 0


def _segmentation(args: argparse.Namespace):
    """The ``--segmentation`` labelmap with its label names, or None."""
    from medalign.core.errors import InputError

    if args.segmentation is None:
        if args.segmentation_labels is not None:
            raise InputError("--segmentation-labels names the labels of a --segmentation labelmap; give both.")
        return None
    if not args.report:
        raise InputError("--segmentation only serves the structured report; add --report.")
    if args.segmentation_labels is None:
        raise InputError("Give --segmentation-labels (one 'value name' per line) so the labelmap's labels have names.")
    from medalign.core.volume_io import read_volume
    from medalign.inference.report import Segmentation, read_label_names

    return Segmentation(read_volume(args.segmentation), read_label_names(args.segmentation_labels),
                        source=f"segmentation '{args.segmentation.name}'")


def _screen(args: argparse.Namespace, out: Path):
    from medalign.core.errors import InputError
    from medalign.core.volume_io import read_volume
    from medalign.inference.cohort import run_settings
    from medalign.inference.screener import Screener

    if args.sample:
        volume, source = _sample_volume(out)
    elif args.input:
        volume, source = read_volume(args.input), Path(args.input)
    else:
        raise InputError("Give a CT file or DICOM folder to screen, or --sample to try a generated chest CT.")
    screener = Screener(model=args.model, findings=args.findings, device=args.device, precision=args.precision,
                        tta=args.tta, adapter=args.adapter)
    with ProgressReporter("screening", machine=args.progress_lines) as progress:
        result = screener(volume, progress=progress, with_maps=not args.no_maps)
    result.settings = run_settings(screener.model_name, screener.findings, not args.no_maps, args.adapter)
    return result, source


FLAG_LEGEND = "flag: * probability >= the finding's threshold (thr); n/c near chance, never flagged."


def print_table(result, stream) -> None:
    from medalign.inference.results import MIN_FLAG_AUC

    print(f"{result.model} on {result.input.get('path', 'volume')} ({result.device}, {result.elapsed_s:.1f} s)", file=stream)
    print(f"{'finding':38s} {'prob':>6s} {'+/-':>6s} {'thr':>5s}  flag  {'AUC':>4s}  hotspot RAS (mm)", file=stream)
    for f in result.ranked():
        h = f.hotspot
        where = "" if h is None else "(" + ", ".join(f"{v:.0f}" for v in h.ras) + ")"
        flag = {"flagged": "  * ", "near chance": " n/c", "": "    "}[f.flag_state]
        auc = "   -" if f.validation_auc is None else f"{f.validation_auc:4.2f}"
        thr = "    -" if f.threshold is None else f"{f.threshold:5.2f}"
        print(f"{f.name[:38]:38s} {f.probability:6.3f} {f.uncertainty:6.3f} {thr}  {flag}  {auc}  {where}", file=stream)
    print(FLAG_LEGEND, file=stream)
    if any(f.validation_auc is not None for f in result.findings):
        print(f"AUC: the model's AUC for the finding on its held-out validation set; n/c (near chance, below "
              f"{MIN_FLAG_AUC}): never flagged.", file=stream)
    for warning in result.warnings:
        print(f"warning: {warning}", file=stream)
    if result.disclaimer:
        print(result.disclaimer, file=stream)
