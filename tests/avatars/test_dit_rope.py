"""3-axis RoPE: any position works, rotations are isometries, scores depend on position differences only."""

import pytest
import torch

from avatars.liveavatar.dit.rope import apply_rope, axis_dims, rope_angles


def _official_style_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Reference written the way Wan writes it: complex pairs, per-axis pair split c−2(c//3), c//3, c//3, and
    unit phasors θ^(−2i/d) · position per axis, all in complex128."""
    head_dim = x.shape[-1]
    pairs = head_dim // 2
    split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    phasors = []
    for axis, n in enumerate(split):
        dim = 2 * n
        inv_freq = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = positions[:, axis : axis + 1].to(torch.float64) * inv_freq
        phasors.append(torch.polar(torch.ones_like(angle), angle))
    phasor = torch.cat(phasors, dim=1)[:, None, :]  # [N, 1, pairs]
    xc = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * phasor).flatten(-2)


def test_axis_split_matches_wan_at_head_dim_128():
    assert axis_dims(128) == (44, 42, 42)
    assert axis_dims(16) == (8, 4, 4)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_matches_the_complex_reference(head_dim):
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(-20, 50_000, (37, 3), generator=g)
    x = torch.randn(2, 37, 3, head_dim, dtype=torch.float64, generator=g)
    ours = apply_rope(x, rope_angles(positions, head_dim))
    torch.testing.assert_close(ours, _official_style_rope(x, positions), rtol=0, atol=1e-12)


def test_positions_far_beyond_the_official_table_work_and_preserve_norms():
    # The official table stops at 45,000 latent frames (~2 h of video); an "infinite" video goes far past it.
    g = torch.Generator().manual_seed(1)
    times = torch.tensor([44_999, 45_000, 1_000_000, 123_456_789, -19])
    positions = torch.stack([times, torch.arange(5) % 3, torch.arange(5) % 4], dim=1)
    x = torch.randn(1, 5, 4, 128, dtype=torch.float64, generator=g)
    rotated = apply_rope(x, rope_angles(positions, 128))
    assert torch.isfinite(rotated).all()
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert not torch.allclose(rotated, x)


def test_rotation_preserves_norm_per_pair_in_fp32_and_keeps_dtype():
    positions = torch.tensor([[1_000_000, 7, 3], [-4, 0, 0]])
    x = torch.randn(1, 2, 2, 16, dtype=torch.bfloat16)
    out = apply_rope(x, rope_angles(positions, 16))
    assert out.dtype == torch.bfloat16
    x32 = torch.randn(1, 2, 2, 16)
    out32 = apply_rope(x32, rope_angles(positions, 16))
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(out32), pair_norm(x32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [1, 3, 45_000, 10_000_000])
def test_scores_depend_only_on_the_position_difference(shift):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 2, 128, dtype=torch.float64, generator=g)
    k = torch.randn(1, 6, 2, 128, dtype=torch.float64, generator=g)
    pos_q = torch.randint(-30, 100, (6, 3), generator=g)
    pos_k = torch.randint(-30, 100, (6, 3), generator=g)
    offset = torch.tensor([shift, shift // 3, shift // 7])

    def scores(pq, pk):
        rq, rk = apply_rope(q, rope_angles(pq, 128)), apply_rope(k, rope_angles(pk, 128))
        return torch.einsum("bihd,bjhd->bhij", rq, rk)

    torch.testing.assert_close(
        scores(pos_q + offset, pos_k + offset), scores(pos_q, pos_k), rtol=0, atol=1e-7
    )
    # ...and they do depend on the difference.
    assert not torch.allclose(scores(pos_q + offset, pos_k), scores(pos_q, pos_k))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        rope_angles(torch.zeros(4, 2), 16)
    with pytest.raises(ValueError, match="does not match"):
        apply_rope(torch.zeros(1, 5, 2, 16), rope_angles(torch.zeros(4, 3), 16))
