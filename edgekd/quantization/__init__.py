"""Quantization: ONNX Runtime int8 (dynamic, static QDQ) and fp16 with accuracy and speed guards,
torchao / pt2e int8 for PyTorch and ExecuTorch, and Core ML weight compression.

``quantize_onnx(fp32_dir, out_dir, QuantizeConfig, calib_inputs, val_inputs, val_labels, metric_fn)``
is the stage for ONNX exports; ONNX methods register under the recipe's ``quantize.method`` names.
"""

from edgekd.quantization.calibration import make_reader  # noqa: F401
from edgekd.quantization.coreml import quantize_coreml  # noqa: F401  (coremltools imported on use)
from edgekd.quantization.onnx_methods import registered_methods  # noqa: F401
from edgekd.quantization.onnx_stage import quantize_onnx  # noqa: F401
from edgekd.quantization.torch_int8 import quantize_torch  # noqa: F401
