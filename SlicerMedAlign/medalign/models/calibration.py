"""What a model (or an adapter) knows about its own scores on labelled data.

Calibration is a typed part of a model rather than loose attributes, so every front end
reads flags, held-out AUCs and calibrated probabilities from one place:

* ``threshold``: the probability at or above which a finding is flagged (picked on
  held-out data; 0.5 when never fitted);
* ``heldout_auc``: the finding's AUC on that held-out set; near-chance findings are never
  flagged (``inference.results.is_near_chance``);
* ``temperature`` and ``bias``: Platt scaling of the present-vs-absent score, fitted on
  labelled data, so that ``sigmoid(score / T + b)`` is a calibrated probability (T = 1,
  b = 0: unfitted). The bias absorbs the base-rate offset a domain shift causes, which no
  temperature can; calibrations stored before it existed read as b = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FindingCalibration:
    threshold: float = 0.5
    heldout_auc: float | None = None
    temperature: float = 1.0
    bias: float = 0.0

    def logit(self, score: float) -> float:
        """Calibrated log-odds of a present-minus-absent logit difference."""
        return score / self.temperature + self.bias

    def score_at(self, probability: float) -> float:
        """The raw score whose calibrated probability is ``probability`` (clipped to (0, 1))."""
        p = min(max(probability, 1e-12), 1.0 - 1e-12)
        return self.temperature * (math.log(p / (1.0 - p)) - self.bias)

    def probability(self, score: float) -> float:
        """Calibrated probability of a present-minus-absent logit difference."""
        z = self.logit(score)
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


UNCALIBRATED = FindingCalibration()


@dataclass(frozen=True)
class Calibration:
    """Per-finding calibration, plus where it was fitted (a cohort path, "training", …)."""

    findings: dict[str, FindingCalibration] = field(default_factory=dict)
    fitted_on: str = ""

    def of(self, finding: str) -> FindingCalibration:
        return self.findings.get(finding, UNCALIBRATED)

    def merged(self, other: Calibration) -> Calibration:
        """``other`` wins finding by finding (an adapter's calibration over its model's)."""
        return Calibration({**self.findings, **other.findings}, other.fitted_on or self.fitted_on)

    def to_dict(self) -> dict:
        return {
            "fitted_on": self.fitted_on,
            "findings": {
                name: {"threshold": c.threshold, "heldout_auc": c.heldout_auc, "temperature": c.temperature,
                       "bias": c.bias}
                for name, c in sorted(self.findings.items())
            },
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> Calibration:
        data = data or {}
        rows = data.get("findings") or {}
        return cls(
            {
                str(name): FindingCalibration(
                    threshold=float(row.get("threshold", 0.5)),
                    heldout_auc=None if row.get("heldout_auc") is None else float(row["heldout_auc"]),
                    temperature=float(row.get("temperature", 1.0)),
                    bias=float(row.get("bias", 0.0)),
                )
                for name, row in rows.items()
            },
            str(data.get("fitted_on", "")),
        )

    @classmethod
    def from_checkpoint_extra(cls, extra: dict) -> Calibration:
        """The demo checkpoints' metadata: ``thresholds``, ``validation_auc`` (and, when
        fitted, ``temperatures`` and ``biases``), each {finding: value}."""
        thresholds = dict(extra.get("thresholds", {}))
        aucs = dict(extra.get("validation_auc", {}))
        temperatures = dict(extra.get("temperatures", {}))
        biases = dict(extra.get("biases", {}))
        names = set(thresholds) | set(aucs) | set(temperatures) | set(biases)
        return cls(
            {
                n: FindingCalibration(
                    threshold=float(thresholds.get(n, 0.5)),
                    heldout_auc=None if aucs.get(n) is None else float(aucs[n]),
                    temperature=float(temperatures.get(n, 1.0)),
                    bias=float(biases.get(n, 0.0)),
                )
                for n in names
            },
            "training" if names else "",
        )


__all__ = ["Calibration", "FindingCalibration", "UNCALIBRATED"]
