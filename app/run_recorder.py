"""One run's media and reports as its chunks arrive: stream segments, the whole-run mp4, the chunk reports,
and the app's own time spent writing media (the "mux" column of the timing table)."""

from __future__ import annotations

import time
from pathlib import Path

from app.media import RunDir, Segment, SegmentBuffer, write_segment
from avatars.base import AvatarChunk, ChunkReport
from avatars.media.run_video import RunVideoWriter

MIN_SEGMENT_SECONDS = 1.0  # Gradio's HLS player plays segments of at least about 1 s smoothly (app.media)


class RunRecorder:
    """Turns one run's chunks into stream segments (when `streaming`) and its final mp4."""

    def __init__(
        self,
        run_dir: RunDir,
        video_name: str,
        streaming: bool,
        min_segment_seconds: float = MIN_SEGMENT_SECONDS,
    ):
        self.run_dir = run_dir
        self.streaming = streaming
        self.reports: list[ChunkReport] = []
        self.mux_seconds: dict[int, float] = {}
        self.video_seconds = 0.0
        self.final_video: Path | None = None
        self._finished = False
        self._segments = SegmentBuffer(min_segment_seconds)
        # A fixed, readable name is safe here: the run folder itself is unique to this run.
        self._video = RunVideoWriter(run_dir.path / video_name)

    def add(self, chunk: AvatarChunk) -> Path | None:
        """Record a chunk; returns the path of a stream segment once enough chunks are in for one."""
        started = time.perf_counter()
        self._video.add(chunk)
        self._charge(chunk.index, time.perf_counter() - started)
        self.reports.append(chunk.report)
        self.video_seconds += len(chunk.frames) / chunk.fps
        if not self.streaming:
            return None
        return self._write(self._segments.push(chunk))

    def finish(self, flush_stream: bool = True) -> tuple[Path | None, Path | None]:
        """The last (possibly short) segment and the finished mp4; either is None when there is none.
        A stopped run passes `flush_stream=False`: nobody would play its last segment."""
        if self._finished:
            return None, self.final_video
        self._finished = True
        pending = self._segments.flush()
        last = self._write(pending) if self.streaming and flush_stream else None
        self.final_video = self._video.close()
        return last, self.final_video

    def discard(self) -> None:
        self._finished = True
        self.final_video = None
        self._video.discard()

    def _write(self, segment: Segment | None) -> Path | None:
        if segment is None:
            return None
        started = time.perf_counter()
        path = write_segment(segment, self.run_dir)
        share = (time.perf_counter() - started) / len(segment.chunk_indices)
        for index in segment.chunk_indices:
            self._charge(index, share)
        return path

    def _charge(self, index: int, seconds: float) -> None:
        self.mux_seconds[index] = self.mux_seconds.get(index, 0.0) + seconds
