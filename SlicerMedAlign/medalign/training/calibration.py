"""Flag thresholds fitted after training on held-out data and stored in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medalign.data.cohorts import load_cohort
from medalign.data.labels import resolve_labels


def calibrate(checkpoint: Path, val_data: Path, device: str = "auto") -> dict[str, dict[str, float]]:
    """Pick each finding's flag threshold (ROC point nearest (0, 1)) on held-out data and
    store it in the checkpoint with the finding's held-out AUC, so ``flagged`` means the same
    thing in every front end and findings the model cannot tell apart are never flagged.
    Returns {finding: {"threshold": t, "auc": a}}."""
    from medalign.core.volume_io import read_volume
    from medalign.evaluation.metrics import point_metrics
    from medalign.inference.screener import Screener
    from medalign.models.medalign_model import load_checkpoint, read_checkpoint, save_checkpoint

    model = load_checkpoint(checkpoint, device="cpu")
    cases = [c for c in load_cohort(val_data) if c.labels is not None or c.report]
    findings = model.training_info.get("trained_findings")
    screener = Screener(model=model, findings=findings, device=device)
    labels = resolve_labels(cases, screener.findings).numpy()
    probs = np.array([[f.probability for f in screener(read_volume(c.volume_path), with_maps=False).findings] for c in cases])
    calibration = {}
    for j, name in enumerate(screener.findings):
        known = labels[:, j] >= 0
        if len(np.unique(labels[known, j])) == 2:
            m = point_metrics(labels[known, j], probs[known, j])
            calibration[name] = {"threshold": round(m["threshold"], 4), "auc": round(m["auc"], 4)}
    _, _, extra = read_checkpoint(checkpoint)
    extra["thresholds"] = {k: v["threshold"] for k, v in calibration.items()}
    extra["validation_auc"] = {k: v["auc"] for k, v in calibration.items()}
    extra["threshold_data"] = str(val_data)
    model.training_info = extra
    save_checkpoint(model, checkpoint, extra=extra)
    return calibration
