"""A denoised and decoded block turned into the chunk the caller gets: the frames the audio covers, exactly the
audio they play with, and the block's report.

The first block drops its first 3 frames, as the official pipeline does; the last block is cut where the audio
ends (a block the audio does not reach at all gives no chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatars.base import AvatarChunk, ChunkReport, ChunkTimings
from avatars.liveavatar.block_layout import DROPPED_FIRST_FRAMES, FPS, VIDEO_FRAMES_PER_BLOCK
from avatars.liveavatar.streaming.audio_timeline import AudioTimeline
from avatars.liveavatar.streaming.messages import StageReport
from avatars.liveavatar.streaming.report_merge import merge_stage_reports

__all__ = ["ChunkAssembler", "DecodedFrames"]


@dataclass(frozen=True)
class DecodedFrames:
    """A block's frames on the host and what their decode cost."""

    frames: np.ndarray  # [12, H, W, 3] uint8
    seconds: float
    hidden_seconds: float = 0.0  # of `seconds`, spent alongside other work (the decode overlap)


class ChunkAssembler:
    """Builds a run's chunks in block order, keeping the place of each on the video's timeline."""

    def __init__(self, audio: AudioTimeline) -> None:
        self.audio = audio
        self.video_frames_done = 0  # frames of the model's timeline handed out or dropped

    def chunk(
        self, block: int, valid_frames: int, decoded: DecodedFrames, parts: list[StageReport]
    ) -> AvatarChunk | None:
        """The chunk of `block` (whose audio covers `valid_frames` of its frames) from its frames and the reports
        of its stages (in step order); None when the audio covers none of the frames kept."""
        start = DROPPED_FIRST_FRAMES if block == 0 else 0
        stop = min(VIDEO_FRAMES_PER_BLOCK, valid_frames)
        first_frame = self.video_frames_done + start
        self.video_frames_done += VIDEO_FRAMES_PER_BLOCK
        if stop <= start:
            return None
        frames = decoded.frames[start:stop]
        last_frame = first_frame + len(frames)
        timings = ChunkTimings(
            model_seconds=sum(part.seconds for part in parts),
            decode_seconds=decoded.seconds,
            decode_hidden_seconds=decoded.hidden_seconds,
        )
        return AvatarChunk(
            index=block,
            frames=frames,
            audio=self.audio.samples_for_frames(first_frame, last_frame, FPS),
            sample_rate=self.audio.sample_rate,
            fps=FPS,
            report=ChunkReport(
                engine=merge_stage_reports(parts),
                timings=timings,
                frames=len(frames),
                end_seconds=last_frame / FPS,
            ),
        )
