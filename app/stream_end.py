"""The players' end of stream, in the browser.

Gradio writes a stream's last piece, the audio its AAC encoder still holds back and the playlist's end tag, only
once the generator has returned. The page's HLS player (hls.js) loads a live playlist again at once whenever the
player's value changes, which Gradio does with every new segment, and otherwise on a timer of its own; but each of
those extra loads pushes that timer one target duration further out, so after a run of segments it lies seconds
ahead, and the player sat at the end of the video for 1.1-1.3 s (Chromium, tests/app/test_ui_browser_pacing.py)
before it found the end. Setting each streaming player's value again once the run's event has ended makes the
page load the playlist at once: the same URL, so the player keeps its place and only reads the new entries.

The page keeps a streamed value as the update it arrived in (marked `__type__: "update"`); handed back as it is,
it would count as a property update that sets nothing, so the marker is dropped."""

RELOAD_ENDED_STREAMS_JS = """(...players) => players.map(
    (value) => (value && value.is_stream ? (({ __type__, ...file }) => file)(value) : value)
)"""
