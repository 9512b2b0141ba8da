"""count_macs against hand-computed numbers."""

from __future__ import annotations

import torch
from torch import nn

from qmambair.eval.complexity import count_macs, macs_by_module
from qmambair.models import build_model


def test_conv_only_any_size():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                        nn.Conv2d(8, 12, 1), nn.PixelShuffle(2), nn.Conv2d(3, 3, 5, padding=2))
    for h, w in [(1, 1), (7, 9), (720, 1280)]:
        hw = h * w
        want = hw * 8 * 27 + hw * 8 * 2 * 9 + hw * 12 * 8 + 4 * hw * 3 * 3 * 25
        got = count_macs(net, h, w)
        assert got["conv"] == got["total"] == want
        assert got["linear"] == got["einsum"] == got["scan"] == 0
        assert got["params"] == sum(p.numel() for p in net.parameters())


def test_single_block_light_model_by_hand():
    # C = 12, d_inner = int(1.2 * 12) = 14, rank = ceil(12/16) = 1, N = 4, K = 4 directions.
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    h, w = 5, 7
    hw = h * w
    C, d, r, N, K = 12, 14, 1, 4, 4
    parts = {
        "conv": (
            hw * C * 3 * 9  # conv_first
            + hw * d * 9  # SS2D depthwise conv
            + hw * (C // 2) * C + hw * (C // 2) * 9 + hw * C * (C // 2) + hw * C * 9  # light CAB
            + 1 * C + C * 1  # channel attention on the pooled vector (one hidden channel)
            + hw * C * C * 9  # layers.0.conv
            + hw * C * C * 9  # conv_after_body
            + hw * (3 * 4) * C * 9  # upsample.0
        ),
        "linear": hw * 2 * d * C + hw * C * d,  # in_proj, out_proj
        "einsum": K * (r + 2 * N) * d * hw + K * d * r * hw,  # x_proj, dt_proj
        "scan": K * d * hw * (5 * N + 1),
    }
    got = count_macs(model, h, w)
    assert {k: got[k] for k in parts} == parts
    assert got["total"] == sum(parts.values())
    assert got["scan_exp"] == K * d * N * hw and got["scan_softplus"] == K * d * hw
    assert got["params"] == sum(p.numel() for p in model.parameters())
    per_module = macs_by_module(model, h, w)
    assert per_module["layers.0.residual_group.blocks.0.self_attention.scan_op"]["macs"] == parts["scan"]
    assert per_module["conv_first"] == {"kind": "conv", "macs": hw * C * 27}


def test_scales_linearly_for_real_preset_and_keeps_mode():
    model = build_model("light-sr-x4").train()
    small, large = count_macs(model, 10, 10), count_macs(model, 20, 20)
    assert model.training
    const = 4 * (60 * 2 + 2 * 60) * 6  # channel attention on pooled vectors: 24 blocks x 240
    assert large["total"] - const == 4 * (small["total"] - const)
    assert small["params"] == 924_492


def test_nested_wrapper_counted_once():
    class Wrapped(nn.Conv2d):
        def __init__(self):
            super().__init__(2, 2, 1)
            self.inner = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.inner(x)

    got = count_macs(nn.Sequential(Wrapped()), 4, 4)
    assert got["conv"] == 16 * 2 * 2
    assert torch.is_grad_enabled()
