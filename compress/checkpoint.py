"""Checkpoints that rebuild without unpickling code: an architecture spec plus a
``state_dict``, written atomically, loaded with ``torch.load(weights_only=True)``."""

import hashlib
import io
import json
from pathlib import Path

import torch

from .errors import CompressError
from .models import build_model
from .storage import atomic_write


def digest_tensor(h, t):
    """Feed `t`'s dtype, shape and bytes (in NCHW order, on the CPU) to the hash `h`."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rebuild(spec):
    """The nn.Module an architecture spec describes (a quantized spec rebuilds the QAT model,
    an ensemble spec each member)."""
    if spec.get("arch") == "ensemble":
        from .models import Ensemble

        return Ensemble([rebuild(m) for m in spec["members"]], spec.get("weights"))
    model = build_model(spec)
    if spec.get("quant"):
        from .quant import QuantSpec, quantize_model

        quant = dict(spec["quant"])
        input_shape = quant.pop("input_shape", None)
        # Checkpoints from before the pt2e backend name none: they were eager.
        quant.setdefault("backend", "eager")
        # ... and from before float_convs, every conv was quantized.
        quant.setdefault("float_convs", "none")
        # ... and from before integer_sigmoid, sigmoids and their products stayed float.
        quant.setdefault("integer_sigmoid", False)
        model = quantize_model(model, QuantSpec(**quant), input_shape)
    return model


def save_checkpoint(path, spec, model):
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Serialized in memory: torch.save(path) names the zip records after the (random) temp
    # file, so the same weights would hash differently; and a full disk is then an OSError.
    # The spec goes through JSON so that its pickle (which shares repeated objects) is the
    # same whether it was built in this process or read back from a stored result.
    buf = io.BytesIO()
    torch.save({"spec": json.loads(json.dumps(spec)), "state_dict": state}, buf)
    atomic_write(path, lambda p: Path(p).write_bytes(buf.getvalue()))


def load_checkpoint(path):
    """(spec, model) from a checkpoint; CompressError if it is unreadable or does not fit."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        spec, state = ckpt["spec"], ckpt["state_dict"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise CompressError(f"{path}: not a readable compress checkpoint ({type(e).__name__})") from None
    try:
        model = rebuild(spec)
    except CompressError as e:
        raise CompressError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CompressError(f"{path}: malformed architecture spec ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0] if lines else ""
        raise CompressError(f"{path}: weights do not fit the stored architecture ({detail[:200]}); "
                            "if the model's code changed since it was saved, `compress run --fresh` "
                            "recomputes") from None
    return spec, model
