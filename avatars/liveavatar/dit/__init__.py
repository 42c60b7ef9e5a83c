"""The causal Wan2.2-S2V DiT that LiveAvatar runs, with its self-attention served by the ISPA engine."""

from avatars.liveavatar.dit.audio_encoder import AUDIO_LEFT_CONTEXT, AudioTokens, block_audio_window
from avatars.liveavatar.dit.text_context import TextContext
from avatars.liveavatar.dit.transformer import LiveAvatarDiT

__all__ = ["AUDIO_LEFT_CONTEXT", "AudioTokens", "LiveAvatarDiT", "TextContext", "block_audio_window"]
