"""Zero-shot screening: encode the image once, score every finding, map where it matches.

``Screener`` holds a model and the prompt latents of a finding list, so a cohort (batch,
eval) pays for the text side once; ``screen`` is the one-call form used by the CLI, the
Slicer module and the console.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medalign.core.errors import CancelledError
from medalign.core.volume import Volume
from medalign.inference.adapter import (
    Adapter,
    adapted_calibration,
    apply_adapter,
    check_model,
    check_registry_model,
    model_fingerprint,
    read_adapter,
)
from medalign.inference.hotspot import hotspot_of
from medalign.inference.preprocess import PreparedImage
from medalign.inference.results import FindingResult, ScreeningResult, is_near_chance
from medalign.inference.text_cache import cached_text_latents, model_identity, text_cache_enabled
from medalign.inference.uncertainty import predictive_entropy, predictive_std, shifted_views
from medalign.knowledge.findings import parse_findings  # noqa: F401 -- its import path since the start
from medalign.models.base import ScreeningModel
from medalign.models.calibration import Calibration

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

DISCLAIMER = "Research use only; not for clinical decisions."
MAX_TTA = 24  # test-time views: four rounds of the six shifts (inference.uncertainty)
_MODEL_CACHE: dict[tuple[str, str], ScreeningModel] = {}


def default_findings() -> list[str]:
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    return list(CT_RATE_FINDINGS)


def get_model(model: str | ScreeningModel | None, device: torch.device) -> tuple[ScreeningModel, str]:
    """A ready model and its display name; registry models are cached per device."""
    from medalign import models
    from medalign.models import registry

    if isinstance(model, ScreeningModel):
        return model.to(device).eval(), getattr(model, "name", model.family)
    name = model or registry.DEFAULT_MODEL
    key = (name, str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = models.load(name, device=str(device))
    return _MODEL_CACHE[key], name


def _move_model(model: ScreeningModel, device: torch.device) -> ScreeningModel:
    """``model`` on ``device`` after a fallback, keeping the cache honest.

    A cached registry model is filed under the device it sits on: moving the CUDA copy
    to the CPU without re-filing it would hand the next CUDA request a CPU model (and a
    CPU copy already cached is reused rather than duplicated).
    """
    key = next((k for k, cached in _MODEL_CACHE.items() if cached is model), None)
    if key is None:  # the caller's own model object: theirs to place
        return model.to(device)
    del _MODEL_CACHE[key]
    target = (key[0], str(device))
    if target not in _MODEL_CACHE:
        _MODEL_CACHE[target] = model.to(device)
    return _MODEL_CACHE[target]


@dataclass
class PromptLatents:
    """Per finding: ensembled positive/negative latents and every variant (for uncertainty)."""

    finding: str
    positive: torch.Tensor  # (P, D)
    negative: torch.Tensor  # (Q, D)
    ensemble: torch.Tensor  # (2, D): mean positive, mean negative (renormalised)


def _default_findings(model: str | ScreeningModel | None) -> str | None:
    if isinstance(model, ScreeningModel):
        return getattr(model, "default_findings", None)
    from medalign.models.registry import DEFAULT_MODEL, default_findings

    return default_findings(model or DEFAULT_MODEL)


def _ensemble(latents: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(latents.mean(0, keepdim=True), dim=-1)


class Screener:
    """A model plus the prompt latents of one finding list, reusable across volumes.

    ``adapter`` (a file from ``medalign adapt`` or an ``Adapter``) replaces its findings'
    ensembled prompt latents and merges its calibration over the model's; it is read
    before the model loads (a bad file costs no model load), chooses the model when none
    is named, and is refused for weights other than its own.
    """

    def __init__(
        self,
        model: str | ScreeningModel | None = None,
        findings: str | Sequence[str] | None = None,
        device: str = "auto",
        precision: str = "auto",
        tta: int = 0,
        adapter: str | Path | Adapter | None = None,
    ) -> None:
        from medalign.core.device import resolve_device
        from medalign.core.errors import InputError

        if not 0 <= int(tta) <= MAX_TTA:
            raise InputError(f"The number of test-time views must lie between 0 and {MAX_TTA}, not {tta}.")
        self.tta = int(tta)  # extra encodings of shifted views, for the uncertainty (inference.uncertainty)
        self.adapter = read_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter
        adapter_path = adapter if isinstance(adapter, (str, Path)) else ""
        if model is None and self.adapter is not None and self.adapter.registered:
            model = self.adapter.model
        if isinstance(model, str) and self.adapter is not None:
            check_registry_model(self.adapter, model, adapter_path)
        # a bad finding list costs no model load; none asked for: the model's own list (its spec's)
        self.findings = parse_findings(findings if findings is not None else _default_findings(model))
        self.device = resolve_device(device)
        self.precision = precision
        self._from_registry = not isinstance(model, ScreeningModel)
        self.model, self.model_name = get_model(model, self.device)
        self.prompts = self._prompt_latents()
        if self.adapter is not None:
            name, sha, _ = self.fingerprint()
            check_model(self.adapter, name, sha, adapter_path)
            self.prompts = apply_adapter(self.prompts, self.adapter)

    def fingerprint(self) -> tuple[str, str, bool]:
        """(name, weights SHA-256, registered) of the model: what an adapter is tied to."""
        return model_fingerprint(self.model, self.model_name if self._from_registry else None)

    def _text_identity(self) -> str:
        """What keys this model's text latents on disk (registry name + weights SHA, or a digest)."""
        if not text_cache_enabled():
            return ""
        registered = self.model_name if self._from_registry else None
        return model_identity(self.model, registered)

    @torch.no_grad()
    def _prompt_latents(self) -> list[PromptLatents]:
        from medalign.knowledge.findings import build_prompts

        use_kb = self.model.use_knowledge_prompts
        sets = [build_prompts(f, self.model.prompt_templates, use_knowledge=use_kb) for f in self.findings]
        texts = [t for s in sets for t in (*s.positive, *s.negative)]
        latents = cached_text_latents(self._text_identity(), texts, self.model.text_latents)
        out, at = [], 0
        for s in sets:
            pos = latents[at : at + len(s.positive)]
            at += len(s.positive)
            neg = latents[at : at + len(s.negative)]
            at += len(s.negative)
            out.append(PromptLatents(s.finding, pos, neg, torch.cat([_ensemble(pos), _ensemble(neg)])))
        return out

    def calibration(self) -> Calibration:
        """Thresholds, held-out AUCs and Platt scalings of the model, the adapter's over them
        (unfitted findings: defaults)."""
        return adapted_calibration(self.model.calibration, self.adapter)

    def features(self, volume: Volume):
        """The frozen encoder's features of ``volume`` exactly as screening computes them
        (preprocessing, precision, GPU fallback): what few-shot adaptation learns on."""
        from medalign.core.device import run_with_fallback

        encoded, _ = run_with_fallback(lambda d: self._encode(volume, d), self.device)
        return encoded.features

    @torch.no_grad()
    def __call__(
        self,
        volume: Volume,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        with_maps: bool = True,
        check: bool = True,
        prepared: PreparedImage | None = None,
    ) -> ScreeningResult:
        """``prepared``: ``volume`` already prepared with this model's profile (a cohort's loader did it)."""
        from medalign.core.device import run_with_fallback
        from medalign.inference.input_checks import check_ct

        report = progress or (lambda f, m: None)
        start = time.perf_counter()

        def step(fraction: float, message: str) -> None:
            if cancel is not None and cancel():
                raise CancelledError("Screening was cancelled; nothing was written.")
            report(fraction, message)

        step(0.0, "checking the input")
        if check:
            check_ct(volume)
        step(0.1, "preprocessing")
        encoded, device = run_with_fallback(lambda d: self._encode(volume, d, prepared), self.device)
        feats, prepared = encoded.features, encoded.prepared
        warnings = list(encoded.coverage) if check else []
        views = self._views(feats, prepared, volume, device)
        step(0.5, "scoring findings")
        findings = self._score(feats, views, prepared, volume, device, step, with_maps)
        step(1.0, "done")
        return ScreeningResult(
            input={k: v for k, v in volume.metadata.items() if isinstance(v, (str, int, float, list, tuple))}
            | {"shape_ijk": list(volume.shape_ijk), "spacing": [round(s, 4) for s in volume.spacing]},
            model=self.model_name,
            device=str(device),
            findings=findings,
            elapsed_s=time.perf_counter() - start,
            disclaimer=getattr(self.model, "disclaimer", DISCLAIMER),
            warnings=warnings,
        )

    def _encode(self, volume: Volume, device: torch.device, prepared: PreparedImage | None = None):
        """The image side, once per (voxels, model, device, precision): a second call is a cache hit."""
        from medalign.inference.feature_cache import encoded_image

        if device != self.device:  # fell back (GPU out of memory): move model and prompts once
            self.model = _move_model(self.model, device)
            self.device = device
            for p in self.prompts:
                p.positive, p.negative, p.ensemble = (t.to(device) for t in (p.positive, p.negative, p.ensemble))
        encode = lambda: self._encode_now(volume, device, prepared)  # noqa: E731
        return encoded_image(volume, self.model, device, self.precision, encode), device

    def _encode_now(self, volume: Volume, device: torch.device, prepared: PreparedImage | None):
        from medalign.core.device import autocast
        from medalign.inference.preprocess import prepare

        if prepared is None or prepared.profile != self.model.profile:
            prepared = prepare(volume, self.model.profile, device=device)
        prepared.tensor = prepared.tensor.to(device)
        with autocast(device, self.precision):
            feats = self.model.image_features(self.model.input_from_grid(prepared.tensor))
        feats.global_latent, feats.tokens = feats.global_latent.float(), feats.tokens.float()
        return feats, prepared

    def _views(self, feats, prepared: PreparedImage, volume: Volume, device: torch.device) -> list:
        """Member scores of the encoding and of ``tta`` shifted views (never cached: the
        views exist only for the uncertainty, and ``tta=0`` costs nothing)."""
        from medalign.core.device import autocast
        from medalign.inference.preprocess import prepare

        views = [self._member_scores(feats)]
        if self.tta and prepared.tensor.numel() == 0:  # a feature-cache hit keeps no input tensor
            prepared = prepare(volume, self.model.profile, device=device)
        for view in shifted_views(prepared.tensor, self.tta, self.model.profile.spacing):
            with autocast(device, self.precision):
                view_feats = self.model.image_features(self.model.input_from_grid(view))
            view_feats.global_latent, view_feats.tokens = view_feats.global_latent.float(), view_feats.tokens.float()
            views.append(self._member_scores(view_feats))
            del view_feats  # one view's tokens at a time
        return views

    def _member_scores(self, feats) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per finding, for one encoding: the ensembled prompts' logit pair (2,) and every
        wording pair's present-minus-absent score (P*Q,), from one ``logits`` call."""
        dev = feats.global_latent.device
        texts = torch.cat([t for p in self.prompts for t in (p.ensemble, p.positive, p.negative)]).to(dev)
        every = self.model.logits(feats, texts)[0]
        out, at = [], 0
        for p in self.prompts:
            n_pos, n_neg = len(p.positive), len(p.negative)
            pair, pos, neg = every[at : at + 2], every[at + 2 : at + 2 + n_pos], every[at + 2 + n_pos : at + 2 + n_pos + n_neg]
            out.append((pair, (pos[:, None] - neg[None, :]).flatten()))
            at += 2 + n_pos + n_neg
        return out

    def _score(self, feats, views, prepared, volume: Volume, device, step, with_maps: bool) -> list[FindingResult]:
        from medalign.inference.preprocess import token_map_to_volume
        from medalign.knowledge.findings import find

        calibration = self.calibration()
        results = []
        dev = feats.global_latent.device
        for n, p in enumerate(self.prompts):
            step(0.5 + 0.5 * n / max(1, len(self.prompts)), f"scoring {p.finding}")
            # the score is the ensembled prompts' logit difference, averaged over the views
            # (one view without TTA); the uncertainty comes from every (view, wording) member
            pairs = torch.stack([v[n][0] for v in views])
            score = float((pairs[:, 0] - pairs[:, 1]).mean())
            fitted = calibration.of(p.finding)
            prob = fitted.probability(score)  # = softmax over the pair at T = 1, b = 0
            members = torch.cat([v[n][1] for v in views])
            map_volume = hotspot = None
            if with_maps:
                tl = self.model.token_logits(feats, p.ensemble.to(dev))[0]  # (2, X', Y', Z')
                token_map = (tl[0] - tl[1]).float().cpu().numpy()
                patch, offset = self.model.token_layout()
                map_volume = token_map_to_volume(token_map, prepared, patch, reference=volume, offset=offset)
                map_volume.metadata.update({"finding": p.finding, "model": self.model_name})
                hotspot = hotspot_of(map_volume)
            published = self.model.published_score(feats, p.positive[:1].to(dev))
            kb = find(p.finding)
            knowledge = {"definition": kb.definition} if kb is not None else {}
            auc = fitted.heldout_auc
            results.append(FindingResult(
                name=p.finding,
                probability=prob,
                uncertainty=predictive_entropy(members, fitted),
                uncertainty_std=predictive_std(members, fitted),
                flagged=prob >= fitted.threshold and not is_near_chance(auc),
                score=score,
                map=map_volume,
                hotspot=hotspot,
                knowledge=knowledge,
                published_score=None if published is None else float(published[0, 0]),
                validation_auc=auc,
                threshold=fitted.threshold,
            ))
        return results


def screen(
    volume: Volume,
    findings: str | Sequence[str] | None = None,
    model: str | ScreeningModel | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    precision: str = "auto",
    with_maps: bool = True,
    tta: int = 0,
    adapter: str | Path | Adapter | None = None,
) -> ScreeningResult:
    """Screen one CT volume for ``findings`` (default: the model's own list), optionally with
    a few-shot ``adapter`` from ``medalign adapt``; ``tta`` extra shifted encodings widen the
    uncertainty to the image side."""
    screener = Screener(model=model, findings=findings, device=device, precision=precision, tta=tta, adapter=adapter)
    return screener(volume, progress=progress, cancel=cancel, with_maps=with_maps)
