"""Causal audio encoder: a block's window equals the official per-block recipe (73 copies of the block's first
frame prepended, first 19 latent outputs dropped), and the conv stack matches a plain reference."""

import pytest
import torch
import torch.nn.functional as F

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import AUDIO_LEFT_CONTEXT, LiveAvatarDiT, block_audio_window

CONFIG = PRESETS["tiny"]
FRAMES = 60  # 5 blocks of 12 video frames


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    dit = LiveAvatarDiT.from_config(CONFIG)
    with torch.no_grad():
        encoder = dit.casual_audio_encoder
        encoder.weights.normal_()
        encoder.encoder.padding_tokens.normal_()
    return dit


@pytest.fixture(scope="module")
def features():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, CONFIG.num_audio_hidden_states, CONFIG.audio_dim, FRAMES, generator=g)


def test_each_block_equals_the_official_per_block_recipe(model, features):
    dropped = (CONFIG.motion_frames + 3) // 4  # 19
    for start in range(0, FRAMES, 12):
        block = features[..., start : start + 12]
        padded = torch.cat([block[..., :1].expand(-1, -1, -1, CONFIG.motion_frames), block], dim=-1)
        official = model.casual_audio_encoder(padded)
        ours = model.encode_audio(block_audio_window(features, start, 12))
        assert ours.tokens.shape == (2, 3, CONFIG.num_audio_token + 1, CONFIG.dim)
        torch.testing.assert_close(ours.tokens, official.tokens[:, dropped:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            ours.global_token, official.global_token[:, dropped:], rtol=1e-5, atol=1e-6
        )


def test_latent_frame_depends_only_on_its_causal_window(model, features):
    # Latent frame j reads video frames [4j − 5, 4j + 3]: changing frame 4j + 4 leaves frames ≤ j untouched.
    base = model.encode_audio(block_audio_window(features, 0, FRAMES)).tokens
    changed = features.clone()
    changed[..., 28] += 1.0  # video frame 28 = first frame of latent frame 7
    after = model.encode_audio(block_audio_window(changed, 0, FRAMES)).tokens
    assert torch.equal(after[:, :7], base[:, :7])
    assert not torch.allclose(after[:, 7], base[:, 7])
    assert not torch.allclose(after[:, 8], base[:, 8])  # frame 28 is in latent 8's window [27, 35]
    assert torch.equal(after[:, 9:], base[:, 9:])  # latent 9 reads [31, 39]


def _reference_encoder(encoder, features):
    """The official MotionEncoder_tc data flow, written with explicit (b t c) layouts."""

    def causal(conv, x, stride):  # x [N, C, T]
        x = torch.cat([x[..., :1], x[..., :1], x], dim=-1)
        return F.conv1d(x, conv.conv.weight, conv.conv.bias, stride=stride)

    def norm_act(x):  # over channels of [N, C, T]
        return F.silu(F.layer_norm(x.permute(0, 2, 1), (x.shape[1],), eps=1e-6)).permute(0, 2, 1)

    w = F.silu(encoder.weights)
    x = (features * w / w.sum(1, keepdim=True)).sum(1)  # [B, A, T]
    b, n, e = x.shape[0], CONFIG.num_audio_token, encoder.encoder
    local = causal(e.conv1_local, x, 1)  # [B, n·c, T]
    local = local.reshape(b, n, -1, local.shape[-1]).reshape(b * n, -1, local.shape[-1])
    local = norm_act(causal(e.conv3, norm_act(causal(e.conv2, norm_act(local), 2)), 2))  # [(b n), dim, T']
    local = local.reshape(b, n, CONFIG.dim, -1).permute(0, 3, 1, 2)  # [B, T', n, dim]
    pad = e.padding_tokens.repeat(b, local.shape[1], 1, 1)
    glob = norm_act(causal(e.conv3, norm_act(causal(e.conv2, norm_act(causal(e.conv1_global, x, 1)), 2)), 2))
    glob = e.final_linear(glob.permute(0, 2, 1))
    return torch.cat([local, pad], dim=2), glob[:, :, None]


def test_encoder_matches_the_plain_reference(model, features):
    tokens, glob = _reference_encoder(model.casual_audio_encoder, features)
    ours = model.casual_audio_encoder(features)
    torch.testing.assert_close(ours.tokens, tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.global_token, glob, rtol=1e-5, atol=1e-6)


def test_window_repeats_the_blocks_first_frame_as_context():
    features = torch.arange(20.0).reshape(1, 1, 1, 20)
    assert block_audio_window(features, 0, 8).flatten().tolist() == [0] * AUDIO_LEFT_CONTEXT + list(range(8))
    assert block_audio_window(features, 12, 8).flatten().tolist() == [12] * AUDIO_LEFT_CONTEXT + list(
        range(12, 20)
    )


@pytest.mark.parametrize(("start", "count"), [(2, 12), (0, 10), (12, 12), (-4, 8)])
def test_window_rejects_misaligned_or_out_of_range_requests(start, count):
    with pytest.raises(ValueError):
        block_audio_window(torch.zeros(1, 3, 32, 20), start, count)


def test_encode_audio_rejects_wrong_shapes(model):
    with pytest.raises(ValueError, match="context frames"):
        model.encode_audio(torch.zeros(1, CONFIG.num_audio_hidden_states, CONFIG.audio_dim, 12))
    with pytest.raises(ValueError, match="wav2vec_hidden_states"):
        model.encode_audio(torch.zeros(1, 25, CONFIG.audio_dim, 17))
