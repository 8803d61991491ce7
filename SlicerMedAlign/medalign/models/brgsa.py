"""BrgSA (Lai et al., "Bridged Semantic Alignment for Zero-shot 3D Medical Image Diagnosis").

A clean-room re-implementation that loads checkpoints of the public code
(github.com/laihaoran/BrgSA @ e79355d6, Apache-2.0) and reproduces its zero-shot numbers:

* image: 3D ViT-B on Conv3d patches (16, 16, 8) of a (B, 1, X, Y, Z) volume (nibabel voxel
  order, which is our model-grid order, so ``input_from_grid`` is the identity); CLS and
  patch tokens both go through ``global_embedder`` (``local_embedder`` is stored but unused);
* text: a BERT whose last 4 hidden layers are summed, word pieces merged, and the tokens up to
  the first ``[SEP]`` summed and divided by the padded length (97), then ``emb_global``;
* knowledge bank (CMKI): ``x_hat = softmax(x D^T) D`` on the raw image embedding;
* published zero-shot score: ``(cos(v, t) + cos(v_hat, t)) / 2`` - no negative prompt, no softmax.

Our screening surface needs a probability, so ``logits`` returns that bridged score times
``logit_scale`` (BrgSA's training temperature ``temp3`` = 10) and the engine softmaxes the
"There is {finding}" / "There is no {finding}" pair; ``brgsa_scores`` returns the exact published
score.  The module tree mirrors the checkpoint (``gloria.`` prefix stripped), so the weights load
strictly with no renaming.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError, InputError
from medalign.models.bank import KnowledgeBank
from medalign.models.base import ImageFeatures, ScreeningModel
from medalign.models.checkpoint_keys import check_state_keys, key_list, shapes
from medalign.models.profiles import BRGSA
from medalign.models.vit3d import ViT3D, ViT3DConfig

PREFIX = "gloria."
# Keys BrgSA's ``load_gloria`` drops because the model does not have them: the
# ``embeddings.position_ids`` / ``token_type_ids`` buffers that transformers < 4.31 saved.
# Every other key must match exactly (BrgSA silently drops any unknown key; we refuse, so a
# checkpoint of another BrgSA variant cannot load half-way).
IGNORED_KEYS = frozenset(
    {
        "text_encoder.model.embeddings.position_ids",
        "text_encoder.model.embeddings.token_type_ids",
    }
)
# BertConfig fields a text-encoder folder's config.json may supply (shapes win for sizes).
_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
)
_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BrgSAConfig:
    """Everything needed to build the module tree; sizes come from checkpoint shapes."""

    vit: ViT3DConfig
    bert: dict[str, Any] = field(default_factory=dict)  # transformers.BertConfig keyword arguments
    embed_dim: int = 768  # joint space (global_embedder / emb_global output)
    bank_size: int = 2048
    bert_pooler: bool = True  # the pooler is stored in BrgSA checkpoints though never used
    word_num: int = 97  # padded prompt length (data.text.word_num)
    last_n_layers: int = 4
    aggregate_method: str = "sum"  # how the last_n_layers are combined: "sum" | "mean"
    agg_tokens: bool = True  # merge "##" word pieces into words
    norm: bool = False  # L2-normalise the text outputs (model.text.norm)
    logit_scale: float = 10.0  # temp3 of BrgSA's contrastive loss

    @classmethod
    def published(cls) -> BrgSAConfig:
        """The configuration of the released BrgSA model (358 checkpoint keys)."""
        return cls(
            vit=ViT3DConfig(),
            bert=dict(
                vocab_size=30522,
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=512,
                type_vocab_size=2,
                hidden_act="gelu",
                layer_norm_eps=1e-12,
                pad_token_id=0,
            ),
        )


def _get(tree: Mapping | None, *path: str, default: Any = None) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """Number of numbered sub-modules ``prefix{i}.`` (max index + 1; gaps show as missing keys)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return max(idx) + 1 if idx else 0


def brgsa_config_from_state_dict(
    state: Mapping[str, torch.Tensor],
    hparams: Mapping | None = None,
    bert_config: Mapping | None = None,
    vit_heads: int | None = None,
) -> BrgSAConfig:
    """Derive the architecture from a (prefix-stripped) state dict's shapes.

    Head counts cannot be read from shapes: the ViT's come from ``vit_heads``, else
    ``hyper_parameters.model.vision.num_heads``, else width / 64 (BrgSA's ViT-B: 12); BERT's
    from the text-encoder folder's config.json, else width / 64.  Works on meta tensors.
    """
    required = (
        "img_encoder.model.cls_token",
        "img_encoder.model.pos_embed",
        "img_encoder.model.patch_embed.proj.weight",
        "img_encoder.model.blocks.0.mlp.fc1.weight",
        "img_encoder.global_embedder.weight",
        "text_encoder.model.embeddings.word_embeddings.weight",
        "text_encoder.model.embeddings.position_embeddings.weight",
        "text_encoder.model.embeddings.token_type_embeddings.weight",
        "text_encoder.model.encoder.layer.0.intermediate.dense.weight",
        "text_encoder.emb_global.weight",
        "dictionarylearning.dictionary.weight",
    )
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(
            f"This is not a BrgSA checkpoint in the layout of the public code: it lacks {key_list(absent, 8)}."
        )
    # image tower
    width = int(state["img_encoder.model.cls_token"].shape[-1])
    pw = state["img_encoder.model.patch_embed.proj.weight"].shape
    if len(pw) != 5:
        raise CheckpointError(f"BrgSA's patch embedding must be a Conv3d weight, found shape {tuple(pw)}.")
    patch = tuple(int(s) for s in pw[2:])
    n_pos = int(state["img_encoder.model.pos_embed"].shape[1]) - 1
    side = round(n_pos ** (1 / 3)) if n_pos > 0 else 0
    if side < 1 or side**3 != n_pos:
        raise CheckpointError(
            f"BrgSA's position table must cover a cubic token grid, but it has {n_pos} patch rows."
        )
    heads = vit_heads or _get(hparams, "model", "vision", "num_heads") or max(1, width // 64)
    if width % int(heads):
        raise CheckpointError(f"The ViT width {width} is not divisible by {heads} attention heads.")
    vit = ViT3DConfig(
        width=width,
        depth=_count(state, "img_encoder.model.blocks."),
        heads=int(heads),
        mlp_dim=int(state["img_encoder.model.blocks.0.mlp.fc1.weight"].shape[0]),
        patch_size=patch,
        base_size=tuple(side * p for p in patch),
        in_channels=int(pw[1]),
    )
    # text tower: sizes from shapes, the rest from the folder's config.json
    vocab, hidden = (int(s) for s in state["text_encoder.model.embeddings.word_embeddings.weight"].shape)
    bert: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count(state, "text_encoder.model.encoder.layer."),
        intermediate_size=int(state["text_encoder.model.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(state["text_encoder.model.embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(state["text_encoder.model.embeddings.token_type_embeddings.weight"].shape[0]),
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
        num_attention_heads=max(1, hidden // 64),
    )
    if bert_config:
        wrong = [
            f"{k} {bert_config[k]} (checkpoint: {bert[k]})"
            for k in _SHAPE_FIELDS
            if k in bert_config and int(bert_config[k]) != bert[k]
        ]
        if wrong:
            raise CheckpointError(
                f"The text-encoder folder's config.json does not match the checkpoint's BERT: {', '.join(wrong)}."
            )
        bert.update({k: bert_config[k] for k in _BERT_FIELDS if k in bert_config and k not in _SHAPE_FIELDS})
    if hidden % int(bert["num_attention_heads"]):
        raise CheckpointError(f"The BERT width {hidden} is not divisible by {bert['num_attention_heads']} heads.")
    text = _get(hparams, "model", "text", default={}) or {}
    cfg = BrgSAConfig(
        vit=vit,
        bert=bert,
        embed_dim=int(state["img_encoder.global_embedder.weight"].shape[0]),
        bank_size=int(state["dictionarylearning.dictionary.weight"].shape[0]),
        bert_pooler="text_encoder.model.pooler.dense.weight" in state,
        word_num=int(_get(hparams, "data", "text", "word_num", default=97)),
        last_n_layers=int(text.get("last_n_layers", 4)),
        aggregate_method=str(text.get("aggregate_method", "sum")),
        agg_tokens=bool(text.get("agg_tokens", True)),
        norm=bool(text.get("norm", False)),
        logit_scale=float(_get(hparams, "model", "gloria", "temp3", default=10.0)),
    )
    if cfg.aggregate_method not in ("sum", "mean") or cfg.last_n_layers < 1:
        raise CheckpointError(
            f"Unsupported BrgSA text settings (last_n_layers {cfg.last_n_layers}, aggregate_method {cfg.aggregate_method!r})."
        )
    if cfg.last_n_layers == 1 and not cfg.bert_pooler:
        raise CheckpointError("BrgSA with last_n_layers 1 uses BERT's pooler, but the checkpoint has no pooler weights.")
    if cfg.last_n_layers > bert["num_hidden_layers"] + 1:
        raise CheckpointError(
            f"BrgSA asks for the last {cfg.last_n_layers} BERT layers but the BERT has {bert['num_hidden_layers']}."
        )
    return cfg


# --------------------------------------------------------------------------- prompt text
def brgsa_prompt_text(text: str) -> str:
    """BrgSA's prompt clean-up before BERT tokenisation (``CLIPProjDict.process_text``).

    Newlines become spaces; the text is split at numbered-list marks ("1.") and at full stops;
    each sentence is lower-cased and cut into ``\\w+`` words; sentences of one word or less are
    dropped (so "There is X" keeps its three words but a bare "Effusion" becomes empty);
    non-ASCII characters are removed; the sentences are joined with spaces.
    """
    text = text.replace("\n", " ")
    sentences = [s for piece in re.split(r"[0-9]+\.", text) for s in piece.split(".")]
    kept = []
    for sentence in sentences:
        words = re.findall(r"\w+", sentence.replace("\ufffd\ufffd", " ").lower())
        if len(words) <= 1:
            continue
        ascii_words = [a for a in (w.encode("ascii", "ignore").decode("ascii") for w in words) if a]
        kept.append(" ".join(ascii_words))
    return " ".join(kept)


# --------------------------------------------------------------------------- modules
class _TextTower(nn.Module):
    """``BertEncoderWithProj``: BERT + ``emb_global`` (sentence) + ``emb_local`` (words)."""

    def __init__(self, cfg: BrgSAConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.model = BertModel(BertConfig(**cfg.bert), add_pooling_layer=cfg.bert_pooler)
        hidden = cfg.bert["hidden_size"]
        self.emb_global = nn.Linear(hidden, cfg.embed_dim)
        self.emb_local = nn.Linear(hidden, cfg.embed_dim)


class _ImageTower(nn.Module):
    """``ImageEncoder`` with base ``vitb_3D``: ViT3D + the two projection heads."""

    def __init__(self, cfg: BrgSAConfig) -> None:
        super().__init__()
        self.model = ViT3D(cfg.vit)
        self.global_embedder = nn.Linear(cfg.vit.width, cfg.embed_dim)
        self.local_embedder = nn.Linear(cfg.vit.width, cfg.embed_dim)  # in the checkpoint, never used


@dataclass
class BrgSAImageOutputs:
    """Intermediate image tensors, named as in the parity fixture."""

    cls: torch.Tensor  # (B, W) ViT CLS after the final LayerNorm (vit_cls_raw)
    patches: torch.Tensor  # (B, L, W) patch tokens, X' slowest, Z' fastest (vit_patch_raw)
    global_emb: torch.Tensor  # (B, D) global_embedder(cls), not normalised (img_emb_g)
    token_emb: torch.Tensor  # (B, L, D) global_embedder(patches) (img_emb_l)
    grid: tuple[int, int, int]  # (X', Y', Z')


@dataclass
class BrgSATextOutputs:
    sentence: torch.Tensor  # (N, D) emb_global(sentence), not normalised (text_emb_g)
    words: torch.Tensor | None  # (N, D, T) emb_local(words), zero-padded words -> bias (text_emb_l)


class BrgSAModel(ScreeningModel):
    """BrgSA ``CLIPProjDict`` with our screening surface on top."""

    family = "brgsa"
    profile = BRGSA
    prompt_templates = {"positive": ["There is {finding}"], "negative": ["There is no {finding}"]}
    use_knowledge_prompts = False  # BrgSA's published protocol: one prompt per finding

    def __init__(self, cfg: BrgSAConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_encoder = _TextTower(cfg)
        self.img_encoder = _ImageTower(cfg)
        self.dictionarylearning = KnowledgeBank(cfg.bank_size, cfg.embed_dim)
        self.patch_size = tuple(cfg.vit.patch_size)
        self.logit_scale = cfg.logit_scale
        self.tokenizer = None
        self._continuation: torch.Tensor | None = None  # (vocab,) bool: id is a "##" piece
        self._sep_id: int | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # ----------------------------------------------------------------- text
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach the BERT tokenizer whose vocabulary the checkpoint's BERT was trained with."""
        vocab = tokenizer.get_vocab()
        rows = self.cfg.bert["vocab_size"]
        if len(vocab) > rows:
            raise CheckpointError(
                f"The tokenizer has {len(vocab)} entries but the checkpoint's BERT only {rows}; "
                "it is the wrong text-encoder folder."
            )
        if tokenizer.sep_token_id is None:
            raise CheckpointError("The text-encoder folder's tokenizer has no [SEP] token, so it is not a BERT tokenizer.")
        cont = torch.zeros(rows, dtype=torch.bool)
        for piece, idx in vocab.items():
            if piece.startswith("##"):
                cont[idx] = True
        self.tokenizer, self._continuation, self._sep_id = tokenizer, cont, int(tokenizer.sep_token_id)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise CheckpointError(
                "BrgSA needs its CXR-BERT tokenizer folder to read prompts; register the model with --text-encoder FOLDER."
            )

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """BrgSA prompt processing + BertTokenizer padded/truncated to ``word_num`` (97) tokens."""
        self._need_tokenizer()
        enc = self.tokenizer(
            [brgsa_prompt_text(t) for t in texts],
            padding="max_length",
            max_length=self.cfg.word_num,
            truncation=True,
            return_tensors="pt",
        )
        dev = self.device
        return {
            "input_ids": enc["input_ids"].to(dev),
            "attention_mask": enc["attention_mask"].to(dev),
            "token_type_ids": torch.zeros_like(enc["input_ids"]).to(dev),
        }

    def _aggregate(self, hs: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Merge "##" pieces into their word (sum) and drop everything after the first [SEP].

        ``hs``: (N, layers, T, H) -> same shape, words packed at the front, zero rows after.
        [CLS] and [SEP] count as words, exactly as BrgSA's ``aggregate_tokens``.
        """
        self._need_tokenizer()
        ids_cpu = input_ids.detach().cpu()
        cont = self._continuation[ids_cpu.clamp(0, self._continuation.numel() - 1)]
        out = torch.zeros_like(hs)
        for n in range(ids_cpu.shape[0]):
            seps = (ids_cpu[n] == self._sep_id).nonzero()
            if seps.numel() == 0:
                raise InputError("BrgSA token ids must contain a [SEP] token (tokenize() adds it).")
            s = int(seps[0])
            starts = ~cont[n, :s]
            if s > 0:
                starts[0] = True  # the first token always opens a word
            group = torch.cat([starts.long().cumsum(0) - 1, (starts.sum().view(1))])  # [SEP] is its own word
            out[n].index_add_(1, group.to(hs.device), hs[n, :, : s + 1])
        return out

    def text_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        words: bool = True,
    ) -> BrgSATextOutputs:
        """BrgSA's text forward: raw (un-normalised) sentence and word embeddings."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = self.text_encoder.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        )
        n = self.cfg.last_n_layers
        if n > 1:
            hs = torch.stack(out.hidden_states[-n:], dim=1)  # (N, n, T, H)
            if self.cfg.agg_tokens:
                hs = self._aggregate(hs, input_ids)
            combine = torch.sum if self.cfg.aggregate_method == "sum" else torch.mean
            sent = combine(hs.mean(dim=2), dim=1)  # divides by the padded length T, as BrgSA does
            word = combine(hs, dim=1)
        else:  # BrgSA then uses the last layer and BERT's pooler output
            word, sent = out.last_hidden_state, out.pooler_output
        sent = self.text_encoder.emb_global(sent)
        word_emb = self.text_encoder.emb_local(word).permute(0, 2, 1) if words else None
        if self.cfg.norm:
            sent = F.normalize(sent, dim=1)
            word_emb = F.normalize(word_emb, dim=1) if word_emb is not None else None
        return BrgSATextOutputs(sentence=sent, words=word_emb)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised BrgSA sentence embeddings."""
        return F.normalize(self.text_embeddings(input_ids, attention_mask, words=False).sentence, dim=-1)

    def text_latents(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenize(texts)
        return self.encode_text(enc["input_ids"], enc["attention_mask"])

    # ----------------------------------------------------------------- image
    def image_embeddings(self, x: torch.Tensor) -> BrgSAImageOutputs:
        """BrgSA's image forward on a (B, 1, X, Y, Z) preprocessed volume."""
        cls, patches, grid = self.img_encoder.model(x)
        emb = self.img_encoder.global_embedder
        return BrgSAImageOutputs(cls=cls, patches=patches, global_emb=emb(cls), token_emb=emb(patches), grid=grid)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_embeddings(x).global_emb, dim=-1)

    def image_features(self, x: torch.Tensor) -> ImageFeatures:
        out = self.image_embeddings(x)
        b, _, d = out.token_emb.shape
        return ImageFeatures(global_latent=out.global_emb, tokens=out.token_emb.reshape(b, *out.grid, d))

    # ----------------------------------------------------------------- scores and maps
    def brgsa_similarities(self, feats: ImageFeatures, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) cos(v, t) and cos(v_hat, t): v_hat is the bank reconstruction of the raw image
        embedding, compared with the ORIGINAL text embedding, as in BrgSA's ``get_similarities``."""
        v = feats.global_latent
        t = F.normalize(text.to(v.dtype), dim=-1)
        v_hat = self.dictionarylearning(v)
        return F.normalize(v, dim=-1) @ t.T, F.normalize(v_hat, dim=-1) @ t.T

    def brgsa_scores(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N) the published zero-shot score (cos(v, t) + cos(v_hat, t)) / 2."""
        sim_global, sim_rec = self.brgsa_similarities(feats, text)
        return (sim_global + sim_rec) / 2

    def published_score(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        return self.brgsa_scores(feats, text)

    def logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """``logit_scale`` (BrgSA's temp3 = 10) times the published score, for a pos/neg softmax."""
        return self.logit_scale * self.brgsa_scores(feats, text)

    def token_logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') cosine of every projected patch token with every text latent.

        This is BrgSA's text-guided heatmap before its per-map min-max scaling.
        """
        p = F.normalize(feats.tokens, dim=-1)
        t = F.normalize(text.to(p.dtype), dim=-1)
        return torch.einsum("bxyzd,nd->bnxyz", p, t)

    def cosine_heatmap(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """BrgSA's ``get_attention_heatmaps.py`` patch map: token cosines min-max scaled per map."""
        sim = self.token_logits(feats, text)
        flat = sim.flatten(2)
        lo, hi = flat.min(-1).values, flat.max(-1).values
        return (sim - lo[..., None, None, None]) / (hi - lo + 1e-12)[..., None, None, None]

    def gwar_heatmap(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') gradient-weighted attention rollout (BrgSA's ``compute_gwar_heatmap``).

        For each prompt: S = sum_b cos(global_embedder(cls_b), t); per layer
        M = rownorm(mean_heads(A) * relu(mean_heads(dS/dA)) + I); R = M_1 ... M_L; the map is
        R[CLS, patches] scaled to sum 1.  One forward, one backward per prompt.  Memory: every
        layer's attention matrix is kept for the backward pass (0.8 GB per layer and image for
        ViT-B at 256x256x128, about 10 GB in all), so run it on one image at a time.
        """
        vit = self.img_encoder.model
        t_all = F.normalize(text.detach().float(), dim=-1)
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)  # builds the graph even with frozen weights
            tok = vit.patch_embed(x)
            grid = tuple(tok.shape[2:])
            h = tok.flatten(2).transpose(1, 2)
            h = torch.cat([vit.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + vit.position_table(grid)
            attns = []
            for blk in vit.blocks:
                y = blk.norm1(h)
                b, n, c = y.shape
                heads = blk.attn.heads
                q, k, v = blk.attn.qkv(y).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
                a = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
                attns.append(a)
                h = h + blk.attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
                h = h + blk.mlp(blk.norm2(h))
            h = vit.norm(h)
            g = F.normalize(self.img_encoder.global_embedder(h[:, 0]), dim=-1)
            # keep only the head-mean of dS/dA (B, T, T) per layer, not the full (B, H, T, T) gradients
            head_mean: list[torch.Tensor | None] = [None] * len(attns)

            def keeper(i: int):
                def hook(grad: torch.Tensor) -> None:
                    head_mean[i] = grad.mean(1)

                return hook

            handles = [a.register_hook(keeper(i)) for i, a in enumerate(attns)]
            maps = []
            try:
                for i in range(t_all.shape[0]):
                    score = (g @ t_all[i]).sum()
                    torch.autograd.grad(score, attns[0], retain_graph=i < t_all.shape[0] - 1)
                    rollout = None
                    for a, ga in zip(attns, head_mean):
                        m = a.detach().mean(1) * ga.clamp_min(0.0)
                        m = m + torch.eye(m.shape[-1], device=m.device, dtype=m.dtype)
                        m = m / (m.sum(-1, keepdim=True) + 1e-6)
                        rollout = m if rollout is None else rollout @ m
                    p = rollout[:, 0, 1:]
                    p = p / (p.sum(-1, keepdim=True) + 1e-6)
                    maps.append(p.reshape(p.shape[0], *grid))
            finally:
                for hnd in handles:
                    hnd.remove()
        return torch.stack(maps, dim=1)


def heatmap_volume_u8(patch_map: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Upsample patch maps (..., a, b, c) trilinearly to ``size`` and min-max them onto 0..255.

    This is what BrgSA's ``get_attention_heatmaps.py`` writes (rounded uint8).  The script
    labels the X'-major token grid as (Z', Y', X') and resizes to (Z, Y, X), so its NIfTI maps are
    X/Z transposed; pass its ``size`` to reproduce that, or the true (X, Y, Z) for a correct map.
    """
    lead = patch_map.shape[:-3]
    grids = patch_map.reshape(-1, 1, *patch_map.shape[-3:]).float()
    up = F.interpolate(grids, size=tuple(size), mode="trilinear", align_corners=False)
    flat = up.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1, 1)
    span = hi - lo
    scaled = torch.where(span > 1e-12, (up - lo) * 255.0 / span.clamp_min(1e-12), torch.zeros_like(up))
    return scaled.round().to(torch.uint8).reshape(*lead, *size)


# --------------------------------------------------------------------------- checkpoint reading
def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def read_brgsa_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(flat state dict with the ``gloria.`` prefix removed, hyper_parameters or None).

    Accepts the Lightning ``.ckpt`` (``{"state_dict": ..., "hyper_parameters": ...}``) when it
    loads with ``torch.load(weights_only=True)``, a plain state-dict ``.pt``, or a flat
    ``.safetensors`` (optional JSON ``hyper_parameters`` in its metadata).  Nothing is
    unpickled beyond tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The BrgSA weight file '{path}' does not exist or is not a file.")
    hparams: dict | None = None
    try:
        if _is_safetensors(path):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            state: Any = load_file(str(path), device="cpu")
            if "hyper_parameters" in meta:
                hparams = json.loads(meta["hyper_parameters"])
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                state = obj["state_dict"]
                hp = obj.get("hyper_parameters")
                hparams = dict(hp) if isinstance(hp, Mapping) else None
            else:
                state = obj
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one sentence
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"'{path.name}' stores Python objects besides tensors ({found.group(1)}, e.g. a Lightning "
                "checkpoint's OmegaConf hyper-parameters), which are never unpickled here; re-save its "
                "state_dict as .safetensors (see the BrgSA model card) and register that file."
            ) from None
        raise CheckpointError(f"'{path.name}' is not a readable weight file (corrupt, truncated or another format).") from None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"'{path.name}' does not hold a state dict of tensors.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"'{path.name}' does not hold a state dict of tensors (entry {key!r} is not a tensor).")
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if key in IGNORED_KEYS:
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out, hparams


def _read_text_folder(folder: str | Path) -> tuple[dict, Any]:
    """(config.json contents or {}, BertTokenizer) from a local CXR-BERT-style folder."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"The BrgSA text-encoder folder '{p}' does not exist or is not a folder.")
    if not (p / "vocab.txt").is_file() and not (p / "tokenizer.json").is_file():
        raise CheckpointError(f"The text-encoder folder '{p}' has no vocab.txt or tokenizer.json for the BERT tokenizer.")
    cfg: dict = {}
    if (p / "config.json").is_file():
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CheckpointError(f"The text-encoder folder's config.json in '{p}' is not valid JSON.") from None
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"The BERT tokenizer in '{p}' could not be loaded.") from None
    return cfg, tokenizer


def build_brgsa(cfg: BrgSAConfig, state: Mapping[str, torch.Tensor], name: str = "checkpoint") -> BrgSAModel:
    """Build on the meta device and adopt the checkpoint tensors (no second copy of the weights)."""
    with torch.device("meta"):
        model = BrgSAModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_keys(expected, shapes(state), f"The BrgSA {name}")
    model.load_state_dict(dict(state), strict=True, assign=True)
    # BERT's non-persistent buffers are not in any checkpoint: make them real again.
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                real = torch.arange(buf.shape[-1], dtype=torch.long).expand(buf.shape)
            elif buf_name == "token_type_ids":
                real = torch.zeros(buf.shape, dtype=torch.long)
            else:  # pragma: no cover - a transformers version with a new buffer
                raise CheckpointError(f"Cannot initialise the buffer {mod_name}.{buf_name} of the BrgSA model.")
            module.register_buffer(buf_name, real.clone(), persistent=False)
    return model


def load_brgsa(
    weights: str | Path,
    text_encoder: str | Path | None = None,
    device: str = "cpu",
    *,
    vit_heads: int | None = None,
) -> BrgSAModel:
    """Load a BrgSA checkpoint (layout of the public code) and its BERT tokenizer folder.

    ``text_encoder``: local CXR-BERT-style folder (vocab.txt, config.json); without it the
    model encodes images but cannot read prompts.  ``vit_heads`` overrides the ViT head count
    (not recoverable from weights; the released model has 12 = 768 / 64, the default).
    Dropped keys: ``IGNORED_KEYS``.  Any other mismatch raises ``CheckpointError``.
    """
    path = Path(weights)
    state, hparams = read_brgsa_checkpoint(path)
    bert_cfg, tokenizer = _read_text_folder(text_encoder) if text_encoder is not None else ({}, None)
    cfg = brgsa_config_from_state_dict(state, hparams, bert_cfg, vit_heads=vit_heads)
    model = build_brgsa(cfg, state, name=f"checkpoint '{path.name}'")
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    return model.to(device).eval()


__all__ = [
    "BrgSAConfig",
    "BrgSAModel",
    "BrgSAImageOutputs",
    "BrgSATextOutputs",
    "IGNORED_KEYS",
    "brgsa_config_from_state_dict",
    "brgsa_prompt_text",
    "build_brgsa",
    "heatmap_volume_u8",
    "load_brgsa",
    "read_brgsa_checkpoint",
]
