"""RoPE placement of noisy, reference and FramePack motion tokens (values read off the official code)."""

import pytest
import torch

from avatars.liveavatar.dit.positions import block_positions, motion_token_count, ref_time, sink_positions


def test_block_positions_are_absolute_frames_in_raster_order():
    pos = block_positions(frame_index=6, frames=3, height=2, width=3)
    assert pos.shape == (18, 3)
    assert pos[:6].tolist() == [[6, 0, 0], [6, 0, 1], [6, 0, 2], [6, 1, 0], [6, 1, 1], [6, 1, 2]]
    assert pos[:, 0].tolist() == [6] * 6 + [7] * 6 + [8] * 6


@pytest.mark.parametrize("ref_shift", [0, 4, 17, 30])
def test_reference_rolls_ahead_of_the_block(ref_shift):
    for frame_index in range(0, 300, 3):
        expected = 30 if frame_index < 30 - ref_shift else frame_index + ref_shift
        assert ref_time(frame_index, ref_shift) == expected


def test_sink_layout_at_384x704():
    # 48×88 latent -> 24×44 tokens: 1056 reference tokens, then 1056 + 264 + 264 motion tokens.
    height, width = 24, 44
    pos = sink_positions(height, width, reference_time=31)
    assert pos.shape[0] == 2640 == height * width + motion_token_count(height, width)
    ref, post, mid, old = pos[:1056], pos[1056:2112], pos[2112:2376], pos[2376:]
    assert ref[:, 0].unique().tolist() == [31]
    assert torch.equal(ref[:, 1:], post[:, 1:])  # the newest motion frame sits on the full grid
    assert post[:, 0].unique().tolist() == [-1]
    assert mid[:, 0].unique().tolist() == [-3]
    # The 16-frame bucket becomes 4 frames, oldest first: times −19, −14, −9, −4 (−linspace(19, 4, 4)).
    assert old[:, 0].reshape(4, -1)[:, 0].tolist() == [-19, -14, -9, -4]
    # Compressed buckets stretch their rows/columns over the full grid: linspace(0, 23, n), truncated.
    assert mid[:, 1].unique().tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert old[:, 1].unique().tolist() == [0, 4, 9, 13, 18, 23]
    assert old[:, 2].unique().tolist() == [0, 4, 8, 12, 17, 21, 25, 30, 34, 38, 43]


def test_tiny_sink_has_40_tokens():
    # 64×64 video -> 8×8 latent -> 4×4 tokens: 16 reference + 16 + 4 + 4 motion tokens.
    assert sink_positions(4, 4, 30).shape == (40, 3)
