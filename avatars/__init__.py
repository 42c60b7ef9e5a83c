"""Model backends that turn a portrait and speech into streamed video chunks."""

from avatars.base import AvatarChunk, GenerationRequest

__all__ = ["AvatarChunk", "GenerationRequest"]
