"""Packed low-bit model files (``.qmb``): dense b-bit weight codes and all else needed to rebuild the model.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89QMB\\r\\n\\x1a\\n"  (PNG-style: catches text-mode mangling early)
    8       2     format version (uint16, currently 1)
    10      2     flags (uint16, 0)
    12      8     payload length in bytes (uint64)
    20      32    SHA-256 of the payload
    52      ...   payload = uint32 index length | zlib(JSON index) | data blob

The JSON index holds the model config, the ``QuantConfig``, the preset name and one entry per tensor (name,
dtype, shape, byte offset and length in the blob). A weight-quantized tensor is stored as its integer codes q
(``qn <= q <= qp``), offset to unsigned ``q - qn`` and packed densely at b bits (``pack_codes``), with the
quantizer's affine map (Ŵ = scale·q − offset) and the exact float32 level table ``levels[q - qn]`` that the
quantizer's eval forward produces; everything else (quantizer parameters, DLS and activation quantizers, float
layers) is stored raw, floats as float32.

Why not safetensors: a quantized MambaIR has thousands of scalar quantizer parameters, and safetensors spends
~100 header bytes on each one (more than the 2-bit weights of a layer); the checksum also needs a wrapper. The
compressed JSON index here costs a few bytes per tensor.

``load_packed`` rebuilds the model from the file alone: ``build_model(config)`` → ``quantize_model`` → load
the raw tensors → put every weight quantizer in a frozen-codes state that returns the stored levels, so the
loaded model's output is bit-identical to the exported model's eval output.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_path

MAGIC = b"\x89QMB\r\n\x1a\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHQ32s")
HEADER_SIZE = _HEADER.size
MAX_BITS = 16
_CHUNK = 1 << 20  # codes per packing chunk (multiple of 8): bounds the temporary bit matrix


class PackedFileError(ValueError):
    """A ``.qmb`` file that cannot be read: truncated, corrupted, not a packed file, or a newer version."""


# ----------------------------------------------------------------------------------------------- bit packing
def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits (no per-value padding)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def pack_codes(codes: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """Pack unsigned codes (any shape, C order) into ``ceil(n*bits/8)`` bytes, LSB first.

    Code i occupies bits [i*b, (i+1)*b) of the little-endian bit stream; only the last byte can have unused
    (zero) bits.
    """
    _check_bits(bits)
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and (not np.issubdtype(flat.dtype, np.integer) or flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes must be integers in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    flat = flat.astype(np.uint16 if bits > 8 else np.uint8)
    if bits == 8:
        return flat
    shifts = np.arange(bits, dtype=flat.dtype)
    parts = [np.zeros(0, np.uint8)]
    for start in range(0, flat.size, _CHUNK):  # a chunk of 8k codes packs to exactly k*b bytes
        bitmat = (flat[start : start + _CHUNK, None] >> shifts) & 1
        parts.append(np.packbits(bitmat.astype(np.uint8).reshape(-1), bitorder="little"))
    return np.concatenate(parts)


def unpack_codes(data: np.ndarray | bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``count`` codes as a flat int64 array."""
    _check_bits(bits)
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else np.asarray(data)
    buf = buf.reshape(-1).astype(np.uint8, copy=False)
    if buf.size != packed_nbytes(count, bits):
        raise ValueError(
            f"{count} codes of {bits} bits need {packed_nbytes(count, bits)} bytes, got {buf.size}"
        )
    if bits == 8:
        return buf.astype(np.int64)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        raw = buf[start * bits // 8 : packed_nbytes(start + n, bits)]
        bitvec = np.unpackbits(raw, count=n * bits, bitorder="little")
        out[start : start + n] = bitvec.reshape(n, bits).astype(np.int64) @ weights
    return out


# ------------------------------------------------------------------------------------------------- container
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class _Blob:
    """Accumulates tensors into one byte blob and describes each in the index."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        span = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return span

    def add_tensor(self, t: torch.Tensor) -> dict[str, Any]:
        if t.is_floating_point():
            t = t.float()
        return {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "span": self.add(_tensor_bytes(t)),
        }


def write_container(path: str | os.PathLike, index: dict[str, Any], blob: bytes) -> Path:
    """Write header + payload atomically (``qmambair.fileio.atomic_path``)."""
    packed_index = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)
    payload = struct.pack("<I", len(packed_index)) + packed_index + blob
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest())
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + payload)
    return path


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    """Check magic, version, length and checksum; return the JSON index and the data blob."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_SIZE:
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise PackedFileError(f"{path}: not a qmambair packed file (wrong magic bytes)")
        raise PackedFileError(
            f"{path}: file is truncated ({len(data)} bytes, the header alone is {HEADER_SIZE})"
        )
    magic, version, _flags, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PackedFileError(f"{path}: not a qmambair packed file (wrong magic bytes {magic[:8]!r})")
    if version != FORMAT_VERSION:
        raise PackedFileError(
            f"{path}: packed format version {version}, this qmambair reads version {FORMAT_VERSION}; "
            "re-export the model with this version (qmambair export) or upgrade qmambair"
        )
    payload = memoryview(data)[HEADER_SIZE:]
    if len(payload) < length:
        raise PackedFileError(
            f"{path}: file is truncated: header announces {length} payload bytes, "
            f"only {len(payload)} present (incomplete copy or download?)"
        )
    if len(payload) > length:
        raise PackedFileError(f"{path}: {len(payload) - length} unexpected bytes after the payload")
    if hashlib.sha256(payload).digest() != digest:
        raise PackedFileError(
            f"{path}: checksum mismatch (SHA-256 of the payload differs from the header): "
            "the file is corrupted; re-export or re-copy it"
        )
    (n,) = struct.unpack_from("<I", payload)
    try:
        index = json.loads(zlib.decompress(payload[4 : 4 + n]))
    except (zlib.error, ValueError) as exc:  # cannot happen with a good checksum unless written by other code
        raise PackedFileError(f"{path}: unreadable index ({exc})") from None
    return index, payload[4 + n :]


def _read_tensor(blob: memoryview, entry: dict[str, Any]) -> torch.Tensor:
    start, size = entry["span"]
    dtype = getattr(torch, entry["dtype"])
    if size == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(blob[start : start + size]), dtype=dtype).reshape(entry["shape"])


# ------------------------------------------------------------------------------------- quantized weights
# SS2D's per-direction projections receive their weight as an argument: (op module, parent parameter).
PROJECTION_WEIGHTS = {"x_proj_op": "x_proj_weight", "dt_proj_op": "dt_projs_weight"}


def quantized_weights(model: nn.Module) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """(state-dict key, weight quantizer, weight) for every weight that goes through a weight quantizer."""
    from .base import Quantizer

    found = []
    for path, module in model.named_modules():
        wq = getattr(module, "weight_quant", None)
        if not isinstance(wq, Quantizer):
            continue
        prefix = f"{path}." if path else ""
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            found.append((f"{prefix}weight", wq, module.weight))
            continue
        parent_path, _, attr = path.rpartition(".")
        if attr not in PROJECTION_WEIGHTS:
            raise ValueError(f"{path}: weight quantizer without a known weight; cannot pack it")
        parent = model.get_submodule(parent_path)
        name = PROJECTION_WEIGHTS[attr]
        found.append((f"{parent_path}.{name}" if parent_path else name, wq, getattr(parent, name)))
    return found


def _decode(quantizer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a frozen quantizer's codes stand for: levels[codes − Qn], or scale·codes − offset."""
    if quantizer.frozen_levels is not None:
        return quantizer.frozen_levels[quantizer.frozen_codes.long() - quantizer.frozen_qn].to(dtype)
    codes = quantizer.frozen_codes.to(dtype)
    return quantizer.frozen_scale.to(dtype) * codes - quantizer.frozen_offset.to(dtype)


def _frozen_forward(self: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Forward of a frozen weight quantizer: the stored levels, whatever the float weight holds.

    The codes are decoded once (at freezing) into ``frozen_weight``; another dtype decodes again.
    """
    if self.frozen_weight.dtype == w.dtype and self.frozen_weight.device == w.device:
        return self.frozen_weight
    return _decode(self, w.dtype).to(w.device)


def freeze_codes(
    quantizer: nn.Module,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    levels: torch.Tensor | None = None,
) -> None:
    """Put a weight quantizer in the frozen-codes state: its forward returns scale·codes − offset
    (or ``levels[codes − Qn]``) from non-persistent buffers, so the state dict keeps its keys."""
    dtype = torch.int16 if quantizer.bits <= 15 else torch.int32
    quantizer.register_buffer("frozen_codes", codes.to(dtype), persistent=False)
    quantizer.register_buffer("frozen_scale", scale.detach().clone(), persistent=False)
    quantizer.register_buffer("frozen_offset", offset.detach().clone(), persistent=False)
    quantizer.register_buffer(
        "frozen_levels", None if levels is None else levels.detach().clone(), persistent=False
    )
    quantizer.frozen_qn = int(quantizer.qn)
    quantizer.register_buffer("frozen_weight", _decode(quantizer, scale.dtype), persistent=False)
    quantizer.forward = types.MethodType(_frozen_forward, quantizer)


def frozen_codes(quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes int64, scale, offset) of a frozen quantizer, else None."""
    if getattr(quantizer, "frozen_codes", None) is None:
        return None
    return quantizer.frozen_codes.long(), quantizer.frozen_scale, quantizer.frozen_offset


def weight_codes(quantizer: nn.Module, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int64 in [Qn, Qp], scale, offset) with Ŵ = scale·codes − offset (frozen codes first)."""
    frozen = frozen_codes(quantizer)
    if frozen is not None:
        return frozen
    if not hasattr(quantizer, "integer_codes"):
        raise ValueError(f"{type(quantizer).__name__} has no integer codes (no integer_codes method)")
    if not bool(getattr(quantizer, "initialized", True)):
        raise ValueError(
            f"{type(quantizer).__name__} is not initialised: run one training batch "
            "(or calibrate) before packing or integer inference"
        )
    codes, scale, offset = quantizer.integer_codes(w.detach())
    return codes.long(), scale.detach(), offset.detach()


def _level_table(codes: torch.Tensor, w_hat: torch.Tensor, qn: int, bits: int) -> torch.Tensor | None:
    """The per-tensor table levels[code − Qn] = Ŵ if every element with the same code has the same Ŵ."""
    idx = (codes - qn).reshape(-1)
    levels = torch.zeros(2**bits, dtype=torch.float32).scatter_(0, idx, w_hat.reshape(-1).float())
    return levels if torch.equal(levels[idx], w_hat.reshape(-1).float()) else None


@torch.no_grad()
def deployable_codes(wq: nn.Module, weight: torch.Tensor, key: str = "weight") -> tuple[torch.Tensor, ...]:
    """(codes, scale, offset, levels or None) reproducing the quantizer's eval output Ŵ bit for bit.

    ``levels`` (a per-tensor table indexed by code − Qn) is only returned when scale·codes − offset is not
    bitwise equal to Ŵ (e.g. DoReFa's tanh map); a quantizer whose output is no function of its codes fails.
    """
    codes, scale, offset = weight_codes(wq, weight)
    w_hat = wq(weight) if frozen_codes(wq) is None else _frozen_forward(wq, weight)
    scale, offset = scale.to(weight.dtype), offset.to(weight.dtype)
    if torch.equal(scale * codes.to(weight.dtype) - offset, w_hat):
        return codes, scale, offset, None
    levels = _level_table(codes, w_hat, int(wq.qn), int(wq.bits))
    if levels is None:
        raise ValueError(f"{key}: {type(wq).__name__} output is not a function of its integer codes")
    return codes, scale, offset, levels


def freeze_weight_quantizers(model: nn.Module) -> int:
    """Pre-deployment weight quantization in place: every weight quantizer returns its fixed codes' levels
    (bit-identical output, no per-call weight quantization; what ONNX export and packed files use)."""
    items = quantized_weights(model)
    for key, wq, weight in items:
        if frozen_codes(wq) is None:
            freeze_codes(wq, *deployable_codes(wq, weight, key))
    return len(items)


# ---------------------------------------------------------------------------------------- export / load
def _training_only_keys(model: nn.Module) -> set[str]:
    """State of weight quantizers that only shapes training: RFA's anchors (their decisions are in the codes).

    Left out of the file; the loaded model keeps anchors on the integer grid, under which re-quantizing the
    stored Ŵ = α·q − β gives back the same codes.
    """
    from .rfa import RFA

    return {f"{path}.anchors" for path, m in model.named_modules() if isinstance(m, RFA)}


def export_packed(qmodel: nn.Module, path: str | os.PathLike) -> Path:
    """Write a quantized model as a ``.qmb`` file (see the module docstring); returns the path.

    Every weight behind a weight quantizer is stored as dense b-bit codes; the stored map is checked to give
    exactly (bit for bit) the quantizer's eval output, else its per-tensor level table is stored too.
    """
    quant_config = getattr(qmodel, "quant_config", None)
    config = getattr(qmodel, "config", None)
    if quant_config is None or config is None:
        raise ValueError("export_packed needs a quantized model (quantize_model) built with build_model")
    from .base import iter_quantizers

    lazy = [name for name, q in iter_quantizers(qmodel) if not bool(q.initialized)]
    if lazy:
        raise ValueError(
            f"{len(lazy)} quantizers are not initialised (e.g. {lazy[0]}): train, or run a batch "
            "in train mode / calibrate(), before packing"
        )
    packed = quantized_weights(qmodel)
    if not packed:
        raise ValueError("the model has no quantized weights to pack")
    blob = _Blob()
    entries: dict[str, dict[str, Any]] = {}
    for key, wq, weight in packed:
        codes, scale, offset, levels = deployable_codes(wq, weight, key)
        entry: dict[str, Any] = {
            "bits": int(wq.bits),
            "qn": int(wq.qn),
            "shape": list(weight.shape),
            "quantizer": type(wq).__name__,
        }
        if levels is not None:
            entry["levels"] = blob.add_tensor(levels)
        entry["codes"] = blob.add(pack_codes(codes - int(wq.qn), int(wq.bits)).tobytes())
        entry["scale"], entry["offset"] = blob.add_tensor(scale), blob.add_tensor(offset)
        entries[key] = entry
    skip = set(entries) | _training_only_keys(qmodel)
    raw = {k: blob.add_tensor(v) for k, v in qmodel.state_dict().items() if k not in skip}
    qc = quant_config.to_dict() if hasattr(quant_config, "to_dict") else dict(quant_config)
    index = {
        "format": "qmambair-packed",
        "config": config,
        "quant_config": qc,
        "preset": getattr(qmodel, "preset", None),
        "packed": entries,
        "raw": raw,
    }
    return write_container(path, index, b"".join(blob.parts))


def load_packed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized model of a ``.qmb`` file (eval mode, weight quantizers frozen to the codes).

    Raises ``PackedFileError`` for a truncated, corrupted, foreign or newer-version file.
    """
    from ..models.checkpoint import load_state_dict_checked
    from ..models.presets import build_model, preset_for_config
    from .convert import QuantConfig, quantize_model

    index, blob = read_container(path)
    try:
        model = build_model(None, **index["config"])
        model.preset = index.get("preset") or preset_for_config(index["config"])
        model = quantize_model(model, QuantConfig(**index["quant_config"]))
        sd = {k: _read_tensor(blob, e) for k, e in index["raw"].items()}
        frozen = {}
        for key, e in index["packed"].items():
            count = int(np.prod(e["shape"]))
            start, size = e["codes"]
            codes = torch.from_numpy(
                unpack_codes(np.frombuffer(blob[start : start + size], np.uint8), e["bits"], count)
            )
            codes = codes.reshape(e["shape"]) + e["qn"]
            scale, offset = _read_tensor(blob, e["scale"]), _read_tensor(blob, e["offset"])
            levels = _read_tensor(blob, e["levels"]) if "levels" in e else None
            frozen[key] = (codes, scale, offset, levels)
            sd[key] = levels[codes - e["qn"]] if levels is not None else scale * codes.float() - offset
    except (KeyError, TypeError, ValueError) as exc:
        raise PackedFileError(
            f"{path}: packed file does not describe a model this qmambair can build ({exc})"
        ) from exc
    own = model.state_dict()
    sd.update({k: own[k] for k in _training_only_keys(model)})
    load_state_dict_checked(model, sd)
    for key, wq, _ in quantized_weights(model):
        if key not in frozen:
            raise PackedFileError(f"{path}: no codes for the quantized weight {key}")
        freeze_codes(wq, *frozen[key])
    return model.eval()


def packed_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a packed file holds, from its index only: bits, packed tensor count, byte counts, configs."""
    index, blob = read_container(path)
    packed = index["packed"]
    return {
        "format_version": FORMAT_VERSION,
        "bits": sorted({e["bits"] for e in packed.values()}),
        "packed_tensors": len(packed),
        "packed_weights": int(sum(np.prod(e["shape"]) for e in packed.values())),
        "packed_bytes": int(sum(e["codes"][1] for e in packed.values())),
        "raw_tensors": len(index["raw"]),
        "raw_bytes": int(sum(e["span"][1] for e in index["raw"].values())),
        "file_bytes": Path(path).stat().st_size,
        "config": index["config"],
        "quant_config": index["quant_config"],
        "preset": index.get("preset"),
    }
