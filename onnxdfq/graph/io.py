"""Load, validate, upgrade and save ONNX models (the only place files are read or written)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from onnxdfq.errors import ModelLoadError, OptionError, UnsupportedModelError

__all__ = [
    "MIN_OPSET", "QDQ_OPS", "load_model", "prepare_model", "save_model_atomic", "opset_of",
    "ensure_distinct_paths", "ensure_writable", "write_text_atomic", "set_metadata", "read_metadata", "model_input",
    "check_model",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis attribute) arrive in opset 13
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
           "MatMulInteger", "DynamicQuantizeLinear"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read a model (external data included) and check it; every failure is a ModelLoadError."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf's DecodeError and friends, missing external files
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'parse error'})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not a valid ONNX model (the graph has no nodes; truncated or not ONNX?)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path}: fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    return model


def prepare_model(model: onnx.ModelProto, *, min_opset: int = MIN_OPSET,
                  allow_quantized: bool = False) -> onnx.ModelProto:
    """Reject already-quantized or weightless models, upgrade the opset, run shape inference."""
    quant_ops = sorted({n.op_type for n in model.graph.node if n.op_type in QDQ_OPS})
    if quant_ops and not allow_quantized:
        raise UnsupportedModelError(f"the model is already quantized (contains {', '.join(quant_ops)}); "
                                    "quantize its FP32 parent instead")
    has_float_weight = any(init.data_type in _FLOAT_TYPES and int(np.prod(init.dims)) > 1
                           for init in model.graph.initializer)
    has_float_weight = has_float_weight or any(
        n.op_type == "Constant" and n.attribute and n.attribute[0].t.data_type in _FLOAT_TYPES
        and int(np.prod(n.attribute[0].t.dims)) > 1 for n in model.graph.node)
    if not has_float_weight:
        raise UnsupportedModelError("the model has no float weights to quantize")
    broken = [init.name for init in model.graph.initializer if init.data_type in _FLOAT_TYPES
              and not np.all(np.isfinite(numpy_helper.to_array(init)))]
    if broken:
        raise UnsupportedModelError(f"the model has NaN or inf in {len(broken)} weight(s): {', '.join(broken[:5])}"
                                    + (" ..." if len(broken) > 5 else ""))
    if opset_of(model) < min_opset:
        try:
            model = version_converter.convert_version(model, min_opset)
        except Exception as exc:
            raise UnsupportedModelError(f"cannot upgrade the model from opset {opset_of(model)} to "
                                        f"{min_opset}: {str(exc).splitlines()[0]}") from None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # shapes help but are not required
        logger.warning("shape inference failed (%s); continuing without inferred shapes", exc)
    return fold_constant_subgraphs(model)


def fold_constant_subgraphs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold what is constant into initializers: shape sub-graphs, and the zero biases PyTorch's dynamo
    exporter computes at run time without optimization (Expand(CastLike(0, x), Shape)), which would
    otherwise hide every Conv's bias, and with it the layer, from the passes.

    CastLike(constant, x) only borrows x's element type; it is replaced by the cast constant first so
    that the rest folds. BatchNormalization and everything else that reads data stays as it is.
    Returns the model unchanged when there is nothing to fold or folding fails.
    """
    if not any(node.op_type in ("CastLike", "Shape", "Expand", "ConstantOfShape") for node in model.graph.node):
        return model
    import onnx_graphsurgeon as gs

    from onnxdfq.graph.layers import const_value

    try:
        graph = gs.import_onnx(model)
        changed = False
        for node in graph.nodes:
            if node.op != "CastLike" or len(node.inputs) != 2:
                continue
            source, target = const_value(node.inputs[0]), node.inputs[1].dtype
            if source is None or target is None:
                continue
            value = np.asarray(source).astype(onnx.helper.tensor_dtype_to_np_dtype(target)
                                              if isinstance(target, int) else target)
            node.op, node.attrs = "Identity", {}
            node.inputs = [gs.Constant(f"{node.name or node.outputs[0].name}_cast", value)]
            changed = True
        graph.fold_constants().cleanup()
        folded = gs.export_onnx(graph)
    except Exception as exc:  # folding is an aid; a model it cannot handle goes on as it was
        logger.warning("constant folding skipped (%s: %s)", type(exc).__name__, str(exc).splitlines()[0][:200])
        return model
    if not changed and len(folded.graph.node) == len(model.graph.node):
        return model
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    return folded


def ensure_distinct_paths(src: str | os.PathLike, dst: str | os.PathLike, *, what: str = "output path",
                          other: str = "the input path; refusing to overwrite the input model") -> None:
    if Path(dst).resolve() == Path(src).resolve():
        raise OptionError(f"{what} {dst} is {other}")


def ensure_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail before any work when ``path`` cannot be written: its folder missing or read-only, or a folder itself."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OptionError(f"{flag} {path} is a directory; give a file name")
    if not directory.is_dir():
        raise OptionError(f"{flag} {path}: the folder {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OptionError(f"{flag} {path}: the folder {directory} is not writable")


def _apply_umask(path: str) -> None:
    """mkstemp files are 0600; give the output the permissions a plain open() would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def model_input(model: onnx.ModelProto, purpose: str) -> tuple[str, list[int | None]]:
    """The name and dims (None where dynamic) of a model's one data input; ``purpose`` words the error."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"{purpose} needs a model with exactly one input, got {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def read_metadata(model: onnx.ModelProto | str | os.PathLike | bytes) -> dict[str, str]:
    """A model's metadata_props as a dict (a path is read without its external weights)."""
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    elif not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # unreadable: the session that loads it reports why
            return {}
    return {prop.key: prop.value for prop in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set metadata_props entries of ``model`` in place (an existing key is replaced, never duplicated)."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*keep, *values.items()]:
        model.metadata_props.add(key=key, value=value)


def check_model(model: onnx.ModelProto) -> None:
    """The ONNX checker on an in-memory model (the same check save_model_atomic runs on the file)."""
    onnx.checker.check_model(model)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike,
                      validate: Callable[[str], None] | None = None) -> None:
    """Write to a temporary file beside `path`, check it, then rename it into place.

    `validate(tmp_path)` may raise; the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.exists():
        raise OptionError(f"output directory {directory} does not exist")
    with _atomic_target(path) as tmp:
        onnx.save(model, tmp)
        onnx.checker.check_model(tmp)
        if validate is not None:
            validate(tmp)


def write_text_atomic(text: str | bytes, path: str | os.PathLike) -> None:
    """Write ``text`` beside ``path`` and rename it into place (the user's umask; no temp file left behind)."""
    with _atomic_target(Path(path)) as tmp, open(tmp, "wb") as handle:
        handle.write(text.encode() if isinstance(text, str) else text)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """A temporary file beside ``path``: renamed onto it (0666 less the umask) when the block succeeds,
    removed when it raises, is interrupted or the process is told to stop (SIGTERM unwinds via SystemExit)."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        _apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
