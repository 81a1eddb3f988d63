"""Text side: CLIP BPE tokenizer (the vocabulary open_clip ships) and the CLIP text transformer.

The tower is open_clip's `TextTransformer` in OpenAI CLIP's layout (QuickGELU, causal mask, pooling
at the end-of-text token, which has the largest id), so OpenAI CLIP weights load key for key:
`token_embedding, positional_embedding, transformer.resblocks.*, ln_final, text_projection`.
`load_openai_text_weights` takes a full CLIP state dict or OpenAI's TorchScript archive and adapts
the position table to the configured context length.
"""

from __future__ import annotations

import functools
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ctclip.models.openclip_import import open_clip

SimpleTokenizer = open_clip.SimpleTokenizer
QuickGELU = open_clip.transformer.QuickGELU
TextTransformer = open_clip.transformer.TextTransformer

VOCAB_SIZE = 49408  # CLIP BPE: 256 bytes x2 + 48894 merges + start/end of text
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.resblocks.", "ln_final.", "text_projection")


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (lower-cased, cleaned; truncation keeps the end-of-text token)."""
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: list[str] | str, context_length: int = 77) -> torch.LongTensor:
    """(B, context_length) token ids; longer texts are truncated and still end with end-of-text."""
    return get_tokenizer(context_length)(texts, context_length=context_length)


def build_text_tower(context_length: int, width: int, layers: int, heads: int, embed_dim: int) -> TextTransformer:
    return TextTransformer(
        context_length=context_length,
        vocab_size=VOCAB_SIZE,
        width=width,
        heads=heads,
        layers=layers,
        output_dim=embed_dim,
        act_layer=QuickGELU,
        pool_type="argmax",
    )


TEXT_POOLS = ("eot", "mean")


def encode_tokens(tower: TextTransformer, tokens: torch.Tensor, pool: str = "eot", causal: bool = True) -> torch.Tensor:
    """`tower(tokens)` computed only up to the batch's longest text; `pool` "mean" averages the final
    token features over each text's tokens (start and end tokens included, padding excluded) instead of
    taking the end-of-text token's. `causal` False (with "mean" only) lets every token attend to the whole
    text instead of to the tokens before it (padding never attended to): in "Pleural effusion is not
    present." the finding's own tokens then see the negation, where under the causal mask only the words
    after "not" can.

    The tokenizer pads every text to the context length (a long context holds whole CT-RATE reports), but
    with the causal mask nothing after a text's end-of-text token reaches the token the tower pools, so
    the padding columns change nothing and cost most of the work when reports vary in length. Equal to
    the full forward up to float rounding (tests/test_ctclip_models.py).
    """
    if pool not in TEXT_POOLS:
        raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {pool!r}")
    if not causal and pool != "mean":
        raise ValueError("a non-causal text tower needs text pool 'mean' (the end token is the causal summary)")
    if tower.cls_emb is not None or tower.pool_type != "argmax" or tower.attn_mask is None:
        if pool != "eot":
            raise ValueError("text pool 'mean' needs a causal text tower without a CLS token")
        return tower(tokens)  # layouts this shortcut does not cover
    length = max(int((tokens != 0).sum(dim=1).max()), 1)
    if length >= tokens.shape[1] and pool == "eot":
        return tower(tokens)
    cut = tokens[:, :length]
    x = tower.token_embedding(cut).to(tower.transformer.get_cast_dtype())
    x = x + tower.positional_embedding[:length].to(x.dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length] if causal else _padding_mask(cut, tower, x.dtype))
    x = tower.ln_final(x)
    if pool == "mean":
        keep = (cut != 0).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    else:
        pooled = x[torch.arange(x.shape[0], device=x.device), cut.argmax(dim=-1)]
    if isinstance(tower.text_projection, torch.nn.Linear):
        return tower.text_projection(pooled)
    return pooled @ tower.text_projection if tower.text_projection is not None else pooled


def _padding_mask(cut: torch.Tensor, tower: TextTransformer, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B * heads, L, L) attention mask: every query sees the text's real tokens, never its padding."""
    pad = (cut == 0)[:, None, :].expand(-1, cut.shape[1], -1)
    mask = torch.zeros(pad.shape, dtype=dtype, device=cut.device).masked_fill(pad, float("-inf"))
    heads = tower.transformer.resblocks[0].attn.num_heads
    return mask.repeat_interleave(heads, dim=0)


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint as a state dict: OpenAI's TorchScript archives or plain (wrapped) state dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a CLIP state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_openai_text_weights(tower: TextTransformer, path: str | Path) -> None:
    """Initialise `tower` from the text keys of a full OpenAI-layout CLIP checkpoint.

    Context lengths other than the file's are handled by truncating (shorter) or linearly interpolating
    (longer) the position table; width, depth, vocabulary or projection mismatches raise ValueError.
    """
    state = read_clip_state_dict(path)
    text = {k: v for k, v in state.items() if k.startswith(TEXT_KEYS)}
    missing = [k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
               if k not in text]
    if missing:
        raise ValueError(f"{path}: not an OpenAI-layout CLIP checkpoint, missing {missing} "
                         "(open_clip checkpoints of custom-text models keep these under 'text.')")
    vocab, width = text["token_embedding.weight"].shape
    layers = len({m.group(1) for k in text if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    proj = tuple(text["text_projection"].shape)
    want_proj = (tower.width, tower.output_dim)
    problems = []
    if width != tower.width:
        problems.append(f"text width {width} (token_embedding {tuple(text['token_embedding.weight'].shape)}) "
                        f"!= text_width {tower.width}")
    if vocab != tower.vocab_size:
        problems.append(f"vocabulary {vocab} != {tower.vocab_size}")
    if layers != len(tower.transformer.resblocks):
        problems.append(f"{layers} text layers != text_layers {len(tower.transformer.resblocks)}")
    if proj != want_proj:
        problems.append(f"text_projection {proj} != (text_width, embed_dim) {want_proj}")
    if problems:
        raise ValueError(f"{path}: text weights do not fit the configured text tower: " + "; ".join(problems))
    text["positional_embedding"] = resize_positional_embedding(text["positional_embedding"], tower.num_pos)
    tower.load_state_dict(text, strict=True)


def resize_positional_embedding(pos: torch.Tensor, length: int) -> torch.Tensor:
    """(L, W) -> (length, W): the first `length` rows when shorter, linear interpolation when longer."""
    if pos.shape[0] >= length:
        return pos[:length].clone()
    grown = F.interpolate(pos.float().T.unsqueeze(0), size=length, mode="linear", align_corners=True)
    return grown[0].T.to(pos.dtype).contiguous()
