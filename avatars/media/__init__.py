"""Chunks to playable media: the H.264/AAC mp4 writer and the whole-run video."""

from avatars.media.mp4 import MediaError, open_mp4_writer
from avatars.media.run_video import MediaPiece, RunVideoWriter, check_piece

__all__ = ["MediaError", "MediaPiece", "RunVideoWriter", "check_piece", "open_mp4_writer"]
