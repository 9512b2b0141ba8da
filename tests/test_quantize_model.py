"""quantize_model: the places of docs/method.md §4.1, loading, save/load, calibration, a QAT smoke run."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from qmambair import build_model
from qmambair.loading import load_model
from qmambair.models.checkpoint import save_model
from qmambair.quant import (
    DLS,
    METHODS,
    PTQ_METHODS,
    RFA,
    ActQuant,
    LSQWeight,
    QConv2d,
    QLinear,
    QuantConfig,
    calibrate,
    describe_quantization,
    format_quantization_table,
    initialize_quantizers,
    iter_quantizers,
    load_float_state_dict,
    quantize_model,
    quantizer_state_keys,
)

TINY = dict(embed_dim=12, depths=(1, 1), d_state=4)


def tiny(name: str = "light-sr-x4", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, **{**TINY, **overrides})


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random but structured images: sums of a few low-frequency sinusoids, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for _ in range(3):
        freq = torch.rand(3, n, 3, 1, 1, generator=g)
        fy, fx, phase = 4 * freq[0], 4 * freq[1], freq[2]
        out += torch.sin(2 * math.pi * (fy * yy + fx * xx + phase))
    lo, hi = out.amin((2, 3), keepdim=True), out.amax((2, 3), keepdim=True)
    return (out - lo) / (hi - lo)


def sr_pair(n: int = 2, lr: int = 8, scale: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    hr = smooth_images(n, lr * scale, seed)
    return torch.nn.functional.avg_pool2d(hr, scale), hr


# --- places -------------------------------------------------------------------------------------------------


def test_light_x4_w4a4_places():
    model = quantize_model(build_model("light-sr-x4"), QuantConfig(method="qmambair", w_bits=4, a_bits=4))
    rows = describe_quantization(model)
    assert {r.bits for r in rows} == {4}
    for g in range(4):
        for j in range(6):
            prefix = f"layers.{g}.residual_group.blocks.{j}."
            counts = Counter(r.quantizer for r in rows if r.path.startswith(prefix))
            assert counts == {"RFA": 9, "DLS": 8, "ActQuant": 8}, (prefix, counts)
            scan = {r.tensor: r.quantizer for r in rows if r.path == prefix + "self_attention.scan_op"}
            assert scan == dict.fromkeys(("u", "delta", "A", "B", "C", "D", "delta_bias"), "DLS")
            out = {r.tensor: r.quantizer for r in rows if r.path == prefix + "self_attention.out_proj"}
            assert out == {"input": "DLS", "weight": "RFA"}
            cab = {r.path.rsplit(".", 1)[1] for r in rows if r.path.startswith(prefix + "conv_blk.cab.")}
            assert cab == {"0", "1", "3", "4"}
        tail = {r.tensor: r.quantizer for r in rows if r.path == f"layers.{g}.conv"}
        assert tail == {"input": "ActQuant", "weight": "RFA"}
    assert Counter(r.quantizer for r in rows) == {"RFA": 9 * 24 + 4, "DLS": 8 * 24, "ActQuant": 8 * 24 + 4}
    float_paths = ("conv_first", "conv_after_body", "upsample", ".attention.", "norm", "ln_")
    assert not [r for r in rows if any(f in r.path for f in float_paths)]
    assert type(model.conv_first) is torch.nn.Conv2d and type(model.upsample[0]) is torch.nn.Conv2d
    table = format_quantization_table(rows)
    assert "ActQuant x196" in table and "DLS x192" in table and "RFA x220" in table
    full = describe_quantization(model, include_float=True)
    assert ("conv_first", "weight", "float", None) in full


def test_classic_cab_quantizes_two_convs():
    model = quantize_model(tiny("classic-sr-x2", embed_dim=36), QuantConfig(bits=2))
    rows = describe_quantization(model)
    cab = {r.path.rsplit(".", 1)[1] for r in rows if ".conv_blk.cab." in r.path}
    assert cab == {"0", "2"}
    assert not [r for r in rows if "conv_before_upsample" in r.path or "conv_last" in r.path]
    assert {r.bits for r in rows} == {2}


@pytest.mark.parametrize(
    "use_dls, use_rfa, dls_slot, weight",
    [(False, False, "ActQuant", "LSQWeight"), (True, False, "DLS", "LSQWeight"),
     (False, True, "ActQuant", "RFA"), (True, True, "DLS", "RFA")],
)
def test_ablation_switches(use_dls, use_rfa, dls_slot, weight):
    model = quantize_model(tiny(), QuantConfig(bits=4, use_dls=use_dls, use_rfa=use_rfa))
    rows = describe_quantization(model)
    assert {r.quantizer for r in rows if r.tensor == "weight"} == {weight}
    assert {r.quantizer for r in rows if r.path.endswith("scan_op") or r.path.endswith("out_proj")
            and r.tensor == "input"} == {dls_slot}
    assert {r.quantizer for r in rows if r.path.endswith("in_proj") and r.tensor == "input"} == {"ActQuant"}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qmambair"])
def test_baselines_use_their_quantizer_in_both_activation_slots(method):
    model = quantize_model(tiny(), QuantConfig(method=method, bits=3))
    reference = quantize_model(tiny(), QuantConfig(bits=3))
    rows, ref_rows = describe_quantization(model), describe_quantization(reference)
    assert [(r.path, r.tensor) for r in rows] == [(r.path, r.tensor) for r in ref_rows]  # same places
    acts = {r.quantizer for r in rows if r.tensor != "weight"}
    weights = {r.quantizer for r in rows if r.tensor == "weight"}
    assert len(acts) == 1 and len(weights) == 1, (acts, weights)
    assert not acts & {"ActQuant", "DLS"} and weights != {"RFA"}


def test_config_shortcuts_and_errors():
    assert QuantConfig(bits=2) == QuantConfig(w_bits=2, a_bits=2)
    assert QuantConfig(bits=4, a_bits=8).a_bits == 8
    cfg = QuantConfig(method="LSQ+", bits=3, dls_per_sample=True)
    assert cfg.method == "lsq+" and QuantConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown quantization method"):
        QuantConfig(method="gptq")
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=5)
    model = quantize_model(tiny(), bits=4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantConfig())


def test_filter_fn_is_recorded_so_checkpoints_rebuild_the_model(tmp_path):
    model = quantize_model(tiny(), QuantConfig(bits=4), filter_fn=lambda m, fqn: "conv_blk" not in fqn)
    assert not [r for r in describe_quantization(model) if "conv_blk" in r.path]
    assert all("conv_blk" in s for s in model.quant_config.skip) and len(model.quant_config.skip) == 8
    model.train()(sr_pair()[0])
    path = save_model(model, tmp_path / "q.safetensors")
    loaded = load_model(path)
    assert loaded.quant_config == model.quant_config


# --- parameters and state dicts ---------------------------------------------------------------------------


def test_parameters_are_shared_and_float_state_dict_loads():
    float_model = tiny(seed=1)
    float_sd = {k: v.clone() for k, v in float_model.state_dict().items()}
    params_before = {id(p) for p in float_model.parameters()}
    q = quantize_model(float_model, QuantConfig(bits=4))
    assert params_before <= {id(p) for p in q.parameters()}  # an optimiser built before still works
    assert isinstance(q.layers[0].conv, QConv2d) and isinstance(
        q.layers[0].residual_group.blocks[0].self_attention.in_proj, QLinear)

    fresh = quantize_model(tiny(seed=2), QuantConfig(bits=4))
    result = fresh.load_state_dict(float_sd, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == quantizer_state_keys(fresh) and result.missing_keys
    fresh = quantize_model(tiny(seed=2), QuantConfig(bits=4))
    load_float_state_dict(fresh, float_sd)
    for k, v in float_sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(ValueError, match="missing"):
        load_float_state_dict(fresh, {k: v for k, v in float_sd.items() if "conv_first" not in k})


@pytest.mark.parametrize("method", ["qmambair", "lsq+", "quantsr", "n2uq", "percentile"])
def test_save_load_eval_identical(method, tmp_path):
    lq, _ = sr_pair()
    model = quantize_model(tiny(), QuantConfig(method=method, bits=4))
    if method in PTQ_METHODS:
        calibrate(model, lq, progress=False)
    else:
        initialize_quantizers(model.train(), lq)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # move quantizer parameters off their init
        model(lq).abs().mean().backward()
        opt.step()
    model.eval()
    probe = smooth_images(1, 8, seed=7) * 3 - 1  # different range than the first batch
    with torch.no_grad():
        expected = model(probe)

    other = quantize_model(tiny(seed=3), QuantConfig(method=method, bits=4))
    other.load_state_dict(model.state_dict())  # strict
    with torch.no_grad():
        assert torch.equal(other.eval()(probe), expected)

    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.quant_config == model.quant_config
    with torch.no_grad():
        assert torch.equal(loaded(probe), expected)


def test_dls_per_sample_model_is_batch_independent():
    model = quantize_model(tiny(), QuantConfig(bits=4, dls_per_sample=True))
    lq, _ = sr_pair(3)
    initialize_quantizers(model.train(), lq)
    model.eval()
    with torch.no_grad():
        alone = model(lq[:1])
        batch = model(torch.cat([lq[:1], 5 * lq[1:]]))
    assert torch.allclose(alone, batch[:1], atol=1e-6)


def test_calibrate_fixes_ptq_ranges_and_8_bit_is_close_to_float():
    lq, _ = sr_pair(4)
    float_model = tiny().eval()
    with torch.no_grad():
        ref = float_model(lq)
    for method in PTQ_METHODS:
        model = quantize_model(tiny(), QuantConfig(method=method, bits=8))
        calibrate(model, list(lq), progress=False)
        with torch.no_grad():
            out = model.eval()(lq)
        assert torch.isfinite(out).all()
        err = (out - ref).abs().mean().item()
        assert err < 0.05 * ref.abs().mean().item(), (method, err)


# --- QAT smoke --------------------------------------------------------------------------------------------


def train_steps(model: torch.nn.Module, lq: torch.Tensor, hr: torch.Tensor, steps: int = 30) -> list[float]:
    """``steps`` Adam steps of L1 on one batch (every parameter's gradient checked finite); the losses."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(lq) - hr).abs().mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    return losses


def l1_with_quantizers_zeroed(model: torch.nn.Module, lq: torch.Tensor, hr: torch.Tensor) -> float:
    """Eval L1 of ``model`` with every quantizer's output replaced by zeros (forward hooks, not the code
    under test): what is left is the float path around the quantized layers (skips, head)."""
    quantizers = [q for _, q in iter_quantizers(model)]
    hooks = [q.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for q in quantizers]
    try:
        with torch.no_grad():
            return (model.eval()(lq) - hr).abs().mean().item()
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def float_qat_reference() -> float:
    """Final L1 (mean of the last 3 steps) of the same tiny float model trained the same way."""
    lq, hr = sr_pair(2, seed=1)
    losses = train_steps(tiny(seed=0), lq, hr)
    return sum(losses[-3:]) / 3


@pytest.mark.parametrize("method", METHODS)
def test_qat_smoke_reduces_l1(method, float_qat_reference):
    """30 QAT steps: the loss falls, ends near the float model trained the same way, and the trained model
    depends on its quantized layers: with their quantizers' outputs zeroed the loss is much higher. (With
    the quantizers sabotaged to output zeros, the loss still falls through the float skip and head, but
    zeroing them afterwards changes nothing.)"""
    lq, hr = sr_pair(2, seed=1)
    model = quantize_model(tiny(seed=0), QuantConfig(method=method, bits=4))
    if method in PTQ_METHODS:
        calibrate(model, lq, progress=False)
    else:
        initialize_quantizers(model.train(), lq)
    losses = train_steps(model, lq, hr)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, (method, first, last)
    assert last < 1.15 * float_qat_reference, (method, last, float_qat_reference)
    with torch.no_grad():
        trained = (model.eval()(lq) - hr).abs().mean().item()
    assert l1_with_quantizers_zeroed(model, lq, hr) > 1.1 * trained, method


def test_qmambair_quantizer_parameters_all_learn():
    """In a QAT step every quantizer parameter gets a finite gradient, and a non-zero one wherever the
    definition (docs/method.md §3.2-§3.4) gives it one, judged from the quantizer's actual input:

    - the learned steps (Act_Quant s, RFA α, LSQ s) always;
    - Act_Quant's offset only where some input was clipped (inside the grid d x̂/dβ = 1 − 1 = 0);
    - RFA: at least one anchor (the anchors next to populated segments);
    - DLS v whenever the tensor is not constant; DLS w exactly when the step is below its stop-gradient cap
      (M − m)/2^b, and exactly zero when it sits on the cap.
    """
    lq, hr = sr_pair(2, seed=2)
    model = quantize_model(tiny(), QuantConfig(bits=4))
    initialize_quantizers(model.train(), lq)
    inputs = {}

    def keep_input(module, args, name):
        inputs[name] = args[0].detach()

    for name, module in model.named_modules():
        if isinstance(module, ActQuant | DLS):
            module.register_forward_pre_hook(lambda m, args, name=name: keep_input(m, args, name))
    (model(lq) - hr).abs().mean().backward()
    checked = Counter()
    for name, module in model.named_modules():
        if not isinstance(module, ActQuant | RFA | DLS | LSQWeight):
            continue
        assert module.initialized.item()
        for pname, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
        if isinstance(module, ActQuant):
            x = inputs[name]
            v = (x + module.offset) / module.step
            clipped = bool(((v < module.qn) | (v > module.qp)).any())
            assert module.step.grad.item() != 0, name
            assert (module.offset.grad.item() != 0) == clipped, (name, clipped)
        elif isinstance(module, RFA):
            assert module.alpha.grad.item() != 0 and module.anchors.grad.abs().sum() > 0, name
        elif isinstance(module, LSQWeight):
            assert module.step.grad.item() != 0, name
        else:
            x = inputs[name]
            with torch.no_grad():
                delta, _, lo, hi = module.step_and_offset(x)
            capped = bool((delta >= (hi - lo) / 2**module.bits).all())
            assert (module.v.grad.abs().sum() > 0) == bool((hi > lo).any()), name
            assert (module.w.grad.abs().sum() > 0) == (not capped), (name, capped)
            checked["dls capped" if capped else "dls free"] += 1
        checked[type(module).__name__] += 1
    assert checked["ActQuant"] and checked["RFA"] and checked["dls free"] and checked["dls capped"], checked


def test_dls_sigma_init_reaches_every_dls_and_is_stored_in_the_config():
    model = quantize_model(tiny(), QuantConfig(bits=2, dls_sigma_init=1.0))
    dls = [q for q in model.modules() if isinstance(q, DLS)]
    assert dls and all(q.w[1].item() == 1.0 for q in dls)
    assert QuantConfig.from_dict(QuantConfig(bits=2, dls_sigma_init=1.0).to_dict()).dls_sigma_init == 1.0
