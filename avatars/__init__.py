"""Model backends that turn a portrait and speech into streamed video chunks."""

from avatars.base import AvatarChunk, ChunkReport, ChunkTimings, GenerationRequest

__all__ = ["AvatarChunk", "ChunkReport", "ChunkTimings", "GenerationRequest"]
