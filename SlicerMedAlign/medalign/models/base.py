"""The surface every screening model offers, whatever its family.

Screening, training, evaluation and the parity tests only talk to this surface, so the
demo model, BrgSA and CT-CLIP are interchangeable in the CLI and in the Slicer panel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from medalign.models.calibration import Calibration
from medalign.models.profiles import PreprocessProfile


@dataclass
class ImageFeatures:
    """One image encoding, reused for every finding (never re-encode per finding).

    ``global_latent``: (B, D) image latent in the joint space, not normalised.
    ``tokens``: (B, X', Y', Z', D) per-token latents in the same space, on the token grid
    whose axes follow the model grid's x, y, z (see ``ScreeningModel.token_layout``).
    """

    global_latent: torch.Tensor
    tokens: torch.Tensor


class ScreeningModel(nn.Module, ABC):
    """A 3D CT vision-language model that can score free-text findings and map them.

    Subclasses set ``family`` (registry family name), ``profile`` (preprocessing) and
    ``prompt_templates`` (``{"positive": [...], "negative": [...]}`` with ``{finding}``).
    """

    family: str = ""
    # FINDING_GROUPS key screened when the user names no finding (Merlin: "abdominal")
    default_findings: str = "ct-rate"
    # True: prompts = family templates x knowledge-base synonyms/negations, averaged.
    # False: exactly the family's own wording (published zero-shot protocol).
    use_knowledge_prompts: bool = True
    profile: PreprocessProfile
    prompt_templates: dict[str, list[str]]
    # thresholds, held-out AUCs and temperatures fitted on labelled data (none until fitted)
    calibration: Calibration = Calibration()

    # --- parity surface (issue 6): identical numbers to the reference code ---
    @abstractmethod
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) preprocessed tensor -> (B, D) L2-normalised image latent."""

    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokenised prompts -> (N, D) L2-normalised text latents."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> {"input_ids", "attention_mask"} on the model's device."""

    # --- screening surface ---
    def input_from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Engine grid tensor (B, 1, X, Y, Z) in ``profile.axcodes`` -> the model's native layout."""
        return x

    @abstractmethod
    def image_features(self, x: torch.Tensor) -> ImageFeatures:
        """Encode the image once: global latent and per-token latents."""

    @abstractmethod
    def text_latents(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> (N, D) text latents in the form ``logits`` expects."""

    @abstractmethod
    def logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N) image-text logits; a positive/negative prompt pair is softmaxed over these."""

    @abstractmethod
    def token_logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') local alignment of every token with every text latent.

        Larger means the token matches the text better; the map of a finding is the
        positive prompt's token logits minus the negative prompt's.
        """

    def published_score(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor | None:
        """(B, N) the score a family's own paper reports, when it differs from the
        pos/neg probability (BrgSA's bridged cosine); None when there is none."""
        return None

    def token_layout(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """(patch size in model voxels along x, y, z; offset of token 0's centre in voxels).

        Token (a, b, c) covers model voxels [a*px, (a+1)*px) etc.; its centre sits at
        a*px + offset.  Used to put token maps back into RAS.
        """
        p = self.patch_size  # type: ignore[attr-defined]
        return tuple(p), tuple((s - 1) / 2.0 for s in p)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
