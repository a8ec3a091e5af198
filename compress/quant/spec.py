"""The quantization scheme, shared by both backends."""

from dataclasses import dataclass

from ..errors import CompressError

BACKENDS = ("auto", "eager", "pt2e")
FLOAT_CONVS = ("auto", "none")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize.

    weight_bits: per-channel symmetric weights, qmax = 2**(bits-1)-1. 7 (+-63) by default:
        onnxruntime's U8S8 kernels on AVX2 CPUs without VNNI saturate with full 8-bit
        weights (-1.1 to -1.3 accuracy points measured, see FINDINGS); 7 bits cost nothing.
    act_bits: per-tensor asymmetric unsigned activations, [0, 2**bits-1]. Below 8 the
        ONNX graph is not bit-exact: QuantizeLinear saturates at 255, not 2**bits-1, so
        values above an observed range are clipped later than in the fake-quant model.
    ema: averaging constant of the activation min/max observers (weight of the new batch).
    backend: ``eager`` (own fake-quant modules; plain ``nn.Sequential`` stacks such as
        the VGGs), ``pt2e`` (torchao's graph-mode flow; any model ``torch.export`` can
        capture) or ``auto`` (eager where it applies, pt2e otherwise).
    float_convs: pt2e backend. ``auto``: a float lead -- the first k convs in graph order
        (and what is computed only from them), for the k leaving the fewest convs on the
        wrong side of ``ort_runtime.integer_conv_slow`` -- stays float, trained and exported so;
        ``none``: every conv is quantized. (The eager backend decides this at export,
        ``float_stem``.)
    float_layers: pt2e backend, when rebuilding a checkpoint: the module paths of the convs
        its ``auto`` lead kept float, kept float again whatever the rule now says (None: the
        rule decides).
    integer_sigmoid: pt2e backend. SiLU is split into ``x * sigmoid(x)`` and every sigmoid
        and every product with a sigmoid (SiLU, squeeze-excitation gates) gets uint8 input
        and output quantizers, so that onnxruntime runs them as QLinearSigmoid and
        QLinearMul instead of float ops between a DequantizeLinear and a QuantizeLinear.
        False: they stay float (checkpoints from before this option).

    >>> QuantSpec(weight_bits=8).weight_bits
    8
    """

    weight_bits: int = 7
    act_bits: int = 8
    ema: float = 0.01
    backend: str = "auto"
    float_convs: str = "auto"
    float_layers: tuple | None = None
    integer_sigmoid: bool = True

    def __post_init__(self):
        # Weights are stored as int8 and activations as uint8, so neither may exceed 8.
        if not 2 <= self.weight_bits <= 8:
            raise CompressError(f"weight_bits: must be in [2, 8], got {self.weight_bits}")
        if not 2 <= self.act_bits <= 8:
            raise CompressError(f"act_bits: must be in [2, 8], got {self.act_bits}")
        if not 0.0 < self.ema <= 1.0:
            raise CompressError(f"ema: must be in (0, 1], got {self.ema}")
        if self.backend not in BACKENDS:
            raise CompressError(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.float_convs not in FLOAT_CONVS:
            raise CompressError(f"float_convs: must be one of {', '.join(FLOAT_CONVS)}, got {self.float_convs!r}")
        if not isinstance(self.integer_sigmoid, bool):
            raise CompressError(f"integer_sigmoid: must be true or false, got {self.integer_sigmoid!r}")
        if self.float_layers is not None:
            if not (isinstance(self.float_layers, (tuple, list))
                    and all(isinstance(p, str) for p in self.float_layers)):
                raise CompressError(f"float_layers: must be a list of module paths, got {self.float_layers!r}")
            object.__setattr__(self, "float_layers", tuple(self.float_layers))
