"""Quantization of MambaIR: Q-MambaIR's DLS and RFA, baseline quantizers, and model conversion.

    from qmambair.quant import QuantConfig, quantize_model, describe_quantization
    qmodel = quantize_model(model, QuantConfig(method="qmambair", bits=4))
"""

from .act import ActQuant
from .base import (
    Quantizer,
    WeightQuantizer,
    broadcast_quantizer_state,
    grad_scale,
    iter_quantizers,
    round_ste,
)
from .baselines import (
    LSQ,
    N2UQ,
    PAMS,
    DoReFa,
    DoReFaWeight,
    LSQPlus,
    LSQPlusWeight,
    LSQWeight,
    MaxAbsWeight,
    N2UQWeight,
    PAMSWeight,
    QuantSR,
    TanhRound,
)
from .calibrate import calibrate, initialize_quantizers
from .convert import (
    METHODS,
    PTQ_METHODS,
    QuantConfig,
    QuantRow,
    describe_quantization,
    format_quantization_table,
    load_float_state_dict,
    quantize_model,
    quantizer_state_keys,
)
from .dls import DLS
from .layers import QConv2d, QLinear, QProjection, QScan
from .ptq import DynamicTokenQuant, MinMaxQuant, PercentileQuant, StaticQuantizer
from .rfa import RFA

__all__ = [
    "ActQuant",
    "DLS",
    "DoReFa",
    "DoReFaWeight",
    "DynamicTokenQuant",
    "LSQ",
    "LSQPlus",
    "LSQPlusWeight",
    "LSQWeight",
    "METHODS",
    "MaxAbsWeight",
    "MinMaxQuant",
    "N2UQ",
    "N2UQWeight",
    "PAMS",
    "PAMSWeight",
    "PTQ_METHODS",
    "PercentileQuant",
    "QConv2d",
    "QLinear",
    "QProjection",
    "QScan",
    "QuantConfig",
    "QuantRow",
    "QuantSR",
    "Quantizer",
    "RFA",
    "StaticQuantizer",
    "TanhRound",
    "WeightQuantizer",
    "broadcast_quantizer_state",
    "calibrate",
    "describe_quantization",
    "format_quantization_table",
    "grad_scale",
    "initialize_quantizers",
    "iter_quantizers",
    "load_float_state_dict",
    "quantize_model",
    "quantizer_state_keys",
    "round_ste",
]
