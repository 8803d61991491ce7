"""``medalign label-reports``: turn free-text CT reports into 0/1 finding labels.

Labels made this way let a site evaluate screening on its own archive without manual
annotation (``medalign eval`` reads the CSV it writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medalign.cli.options import FINDINGS_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label-reports",
        help="label free-text reports (0/1 per finding) with the rule-based labeller",
        description="Read a CSV of reports and write one 0/1 column per finding (the 18 CT-RATE "
        "abnormalities by default). Negated findings are 0; hedged ones ('possible', "
        "'cannot be excluded') are 1.",
    )
    p.add_argument("reports", type=Path, help="CSV with one report per row")
    p.add_argument("--out", required=True, type=Path, help="labels CSV to write")
    p.add_argument("--text-column", default="report_text", help="column holding the report text (default: report_text)")
    p.add_argument("--id-column", default=None,
                   help="column copied to the output as the case id (default: VolumeName or AccessionNo, if present)")
    p.add_argument("--findings", default="ct-rate",
                   help=FINDINGS_HELP.replace('"A;B;..." finding names or free text', '"A;B;..." knowledge-base finding names')
                   + ' ("," also separates names here, as before)')
    p.set_defaults(func=run)


def _findings(spec: str) -> list[str]:
    """The --findings list through the shared parser; the labeller needs known findings."""
    from medalign.core.errors import InputError
    from medalign.knowledge.findings import find, load_knowledge, parse_findings

    kb = load_knowledge()
    names: list[str] = []
    for part in parse_findings(spec, separators=";,"):
        item = find(part, kb)
        if item is None:
            raise InputError(f"Unknown finding {part!r}: the labeller needs a finding from the knowledge base.")
        if item.name not in names:
            names.append(item.name)
    return names


def run(args: argparse.Namespace) -> int:
    from medalign.data.report_labeller import label_reports_csv

    out = label_reports_csv(
        args.reports,
        args.out,
        text_column=args.text_column,
        id_column=args.id_column,
        findings=_findings(args.findings),
    )
    print(out)
    return 0
