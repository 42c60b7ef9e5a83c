"""Checks on what a user hands the app: the portrait, the driving audio, text to speak, and the settings.

Each check returns a typed result holding the cleaned value plus warnings for the UI, or raises
`ValidationError` with a message that can be shown as it is.
"""

from app.validation.audio import MAX_AUDIO_SECONDS, MIN_AUDIO_SECONDS, SILENCE_RMS, AudioCheck, validate_audio
from app.validation.errors import ValidationError
from app.validation.portrait import MAX_PORTRAIT_PIXELS, MAX_PORTRAIT_SIDE, PortraitCheck, validate_portrait
from app.validation.settings import MAX_SEED, Settings, validate_settings
from app.validation.text import MAX_PROMPT_CHARS, MAX_TTS_CHARS, CleanText, validate_prompt, validate_tts_text

__all__ = [
    "MAX_AUDIO_SECONDS",
    "MAX_PORTRAIT_PIXELS",
    "MAX_PORTRAIT_SIDE",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_TTS_CHARS",
    "MIN_AUDIO_SECONDS",
    "SILENCE_RMS",
    "AudioCheck",
    "CleanText",
    "PortraitCheck",
    "Settings",
    "ValidationError",
    "validate_audio",
    "validate_portrait",
    "validate_prompt",
    "validate_settings",
    "validate_tts_text",
]
