"""INT8 quantization: fake-quant models for QAT and post-training calibration, and the
integer modules that export to a standard QDQ ONNX graph.

Backends, one file each: ``eager`` (own fake-quant modules for plain ``nn.Sequential``
conv/BN/ReLU/pool/linear stacks, BN folding simulated as in Jacob et al. 2018).
"""

from .eager import (ActQuant, Int8Conv2d, Int8Linear, QConv2d, QLinear, QuantSpec,  # noqa: F401
                    calibrate, is_quantized, quantize_model, set_qat_phase, to_int8_module)
