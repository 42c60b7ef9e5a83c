"""The prompt → umT5 encoder states the DiT's cross-attention reads.

As in the official pipeline: the prompt is cleaned (HTML entities unescaped, whitespace collapsed), tokenized to
`text_len` tokens with padding and truncation, encoded with the attention mask, cut to its real length and then
zero-padded back to `text_len`; the DiT attends over all `text_len` positions, padding included.

The umT5-XXL encoder is 11 GB in bf16, so it can live on the CPU and visit the GPU only while encoding
(`offload=True`); the states of the last `max_cached_prompts` prompts are kept (least recently used dropped first),
so a prompt is encoded once per run while a long-lived app cannot fill the GPU with one tensor per prompt ever typed.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel


def clean_prompt(prompt: str) -> str:
    """The official 'whitespace' cleaning, without ftfy's mojibake repair (not a dependency here)."""
    text = html.unescape(html.unescape(prompt)).strip()
    return re.sub(r"\s+", " ", text).strip()


DEFAULT_MAX_CACHED_PROMPTS = 8


class TextEncoder:
    """umT5 encoder + tokenizer with a bounded per-prompt cache; outputs [text_len, d_model] on `device`."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        text_len: int,
        device: torch.device | str = "cpu",
        offload: bool = False,
        max_cached_prompts: int = DEFAULT_MAX_CACHED_PROMPTS,
    ) -> None:
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        if (
            isinstance(max_cached_prompts, bool)
            or not isinstance(max_cached_prompts, int)
            or max_cached_prompts < 1
        ):
            raise ValueError(f"max_cached_prompts must be a positive int, got {max_cached_prompts!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.device = torch.device(device)
        self.offload = offload
        self.model.to("cpu" if offload else self.device)
        self._encode_cached = functools.lru_cache(maxsize=max_cached_prompts)(self._encode)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        text_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        offload: bool = False,
    ) -> TextEncoder:
        """Load the diffusers `text_encoder/` and `tokenizer/` folders."""
        model = UMT5EncoderModel.from_pretrained(str(text_encoder_dir), dtype=dtype)
        return cls(
            model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), text_len, device=device, offload=offload
        )

    @property
    def cached_prompts(self) -> int:
        """How many prompts' states the cache holds now (at most `max_cached_prompts`)."""
        return self._encode_cached.cache_info().currsize

    def encode(self, prompt: str) -> torch.Tensor:
        """States [text_len, d_model] for `prompt`, zero past its tokens; cached (bounded, see the module)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return self._encode_cached(prompt)

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(prompt)],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        if self.offload:
            self.model.to(self.device)
        try:
            states = self.model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device),
            ).last_hidden_state[0]
        finally:
            if self.offload:
                self.model.to("cpu")
        length = int(tokens.attention_mask.sum())
        padded = torch.zeros_like(states)
        padded[:length] = states[:length]
        return padded
