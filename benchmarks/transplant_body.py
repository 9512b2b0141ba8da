"""Start a super-resolution model of one scale from the trained body of another scale's model.

Standard SR practice (EDSR initialised its ×3 and ×4 models from the ×2 one): everything before the
upsampler — shallow conv, residual groups, the conv after the body — is the same at every scale, so a
body trained longer at one scale is a good start at another. The output is a float model of ``--tail``'s
architecture with every weight from ``--body`` except the upsampler's (``upsample.*``), which comes from
``--tail``. Both must be the same architecture apart from the upsampler. Used by the training campaign
(``campaign/README.md``: the ×2 stage ``x2-fp4`` starts from the ×4 stage's body)::

    python benchmarks/transplant_body.py --body campaign/x4-fp3/best-step3000.safetensors \\
        --tail campaign/x2-fp3/step1225.safetensors --out runs/x2-init.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

UPSAMPLER = "upsample."


def transplant(body: nn.Module, tail: nn.Module) -> tuple[nn.Module, int]:
    """``tail`` with every non-upsampler tensor replaced by ``body``'s (in place); (tail, tensors copied).

    Raises ValueError naming the first tensor that is missing from ``body`` or differs in shape.
    """
    source = body.state_dict()
    target = tail.state_dict()
    copied = 0
    for name, tensor in target.items():
        if name.startswith(UPSAMPLER):
            continue
        if name not in source:
            raise ValueError(f"the body model has no {name!r}: not the same architecture")
        if source[name].shape != tensor.shape:
            raise ValueError(f"{name!r} is {tuple(source[name].shape)} in the body model and "
                             f"{tuple(tensor.shape)} in the tail model: not the same architecture")
        target[name] = source[name]
        copied += 1
    extra = sorted(n for n in source if n not in target and not n.startswith(UPSAMPLER))
    if extra:
        raise ValueError(f"the tail model has no {extra[0]!r}: not the same architecture")
    tail.load_state_dict(target)
    return tail, copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--body", required=True, help="model file whose body is kept (any scale)")
    p.add_argument("--tail", required=True, help="model file or training checkpoint of the target scale")
    p.add_argument("--out", required=True, help="the new .safetensors model file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)

    from qmambair.errors import UserError
    from qmambair.loading import load_model
    from qmambair.models.checkpoint import save_model

    out = Path(args.out)
    if out.suffix != ".safetensors":
        p.error(f"--out must end in .safetensors, got {out.name!r}")
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    if any(out.resolve() == Path(f).resolve() for f in (args.body, args.tail) if Path(f).exists()):
        p.error(f"--out {out} is one of the inputs")
    try:
        body, tail = load_model(args.body), load_model(args.tail)
        for name, model in ((args.body, body), (args.tail, tail)):
            if getattr(model, "quant_config", None) is not None:
                raise ValueError(f"{name} is a quantized model; transplant float models")
        model, copied = transplant(body, tail)
    except (UserError, OSError, ValueError) as e:
        print(f"transplant_body: error: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    print(f"{out}: {copied} tensors from {args.body}, the upsampler from {args.tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
