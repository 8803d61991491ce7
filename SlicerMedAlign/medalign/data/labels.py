"""Labels of a cohort for a list of findings, as training, calibration and evaluation
all need them: labels.csv where a case has it, else what its report says."""

from __future__ import annotations

import torch

from medalign.data.cohorts import Case


def resolve_labels(cases: list[Case], findings: list[str]) -> torch.Tensor:
    """(N, F) labels: labels.csv where present, else read from the report; -1 = unknown."""
    from medalign.data.report_labeller import label_report

    out = torch.full((len(cases), len(findings)), -1, dtype=torch.long)
    for i, c in enumerate(cases):
        labels = c.labels if c.labels is not None else (label_report(c.report, findings) if c.report else None)
        if labels is None:
            continue
        for j, f in enumerate(findings):
            if f in labels:
                out[i, j] = int(labels[f])
    return out
