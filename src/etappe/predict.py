"""Run a trained or exported model on files: images, IDX files, NumPy arrays, CSV rows.

    predict("runs/digits-cnn/export/model.onnx", ["three.png", "more.npy"], top=3)
    -> [{"input": "three.png", "class": 3, "probability": 0.98, "top": [{"class": 3, "probability": 0.98}, ...]},
        ...]

The model is anything ``etappe.export.load_model`` reads: a run or checkpoint folder, a state dict, TorchScript,
``.pt2`` or ``.onnx``. What the model expects comes from the checkpoint's data spec or the export's sidecar:
the input shape (one sample), the number of classes (none: regression), and the input scale of the data set.

How values become model inputs:
  images (.png .jpg ...)  pixels / 255 (/ 65535 for 16-bit): the [0, 1] range the built-in image sets use.
                          Size and channels must match the model's (C, H, W) unless ``resize=True``.
  .npy, IDX files         integer arrays are raw stored values, scaled like the data set (digits: / 16,
                          MNIST: / 255); floating arrays are model inputs as they are. One sample, or a batch.
  .csv                    one sample per row, model inputs as they are, flattened; a header row is skipped.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from etappe.errors import DataError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_PIXELS = 2**25  # an image's width x height: decoding one allocates several bytes per pixel
READS = ("images (" + " ".join(IMAGE_SUFFIXES) + "), IDX files (*-ubyte, *.idx, optionally .gz), "
         "NumPy arrays (.npy) and CSV rows (.csv)")


def predict(
    model: Any,
    inputs: str | Path | np.ndarray | Sequence[str | Path],
    *,
    top: int = 1,
    resize: bool = False,
    batch_size: int = 256,
    which: str = "best",
    input_shape: Sequence[int] | None = None,
    model_name: str | None = None,
    trusted: bool = False,
    weights: str = "raw",
) -> list[dict]:
    """Predict for every sample in ``inputs`` (paths, or one array). ``model`` is a path ``load_model`` reads.

    Classification: ``{"input", "class", "probability", "top": [{"class", "probability"}, ...]}`` with the
    ``top`` most probable classes (softmax of the outputs). Regression: ``{"input", "value"}`` (a list when the
    model has several outputs). ``input_shape`` overrides what the model's files record; ``model_name`` (a
    registry name or module:factory) names the model to rebuild weights into, and ``trusted`` allows files that
    run code when loaded (TorchScript, .pt2) and a module:factory named in the model's files, as for ``load_model``;
    ``weights`` "ema" runs a run's averaged weights (trained with ``ema``), "raw" its own.
    """
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    import torch

    from etappe.export import load_model

    module, config = load_model(model, which=which, model=model_name, trusted=trusted, weights=weights)
    spec = dict(config.get("data_spec") or {})
    shape = tuple(input_shape or spec.get("input_shape") or config.get("input_shape") or ())
    if not shape:
        raise UsageError(f"{model} does not record the input shape it expects; pass --input-shape C,H,W")
    scale = float(spec.get("input_scale") or 1.0)
    x, labels = read_inputs(inputs, shape, scale, resize=resize)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = module(torch.from_numpy(x[start:start + batch_size]))
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(out.float().reshape(len(out), -1))
    out = torch.cat(outputs) if outputs else torch.empty(0, 0)
    num_classes = spec.get("num_classes")
    results = []
    if num_classes:
        probs = torch.softmax(out, dim=1)
        k = min(top, probs.shape[1])
        p, c = probs.topk(k, dim=1)
        for label, pi, ci in zip(labels, p.tolist(), c.tolist()):
            ranked = [{"class": int(cls), "probability": float(prob)} for cls, prob in zip(ci, pi)]
            results.append({"input": label, "class": ranked[0]["class"], "probability": ranked[0]["probability"],
                            "top": ranked})
    else:
        for label, row in zip(labels, out.tolist()):
            results.append({"input": label, "value": row[0] if len(row) == 1 else row})
    return results


def format_results(results: list[dict]) -> str:
    """One line per input, for people."""
    lines = []
    for r in results:
        if "class" in r:
            ranked = "  ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"][1:])
            rest = f"  then {ranked}" if ranked else ""
            lines.append(f"{r['input']}: class {r['class']} (p={r['probability']:.3f}){rest}")
        else:
            value = r["value"]
            shown = f"{value:.6g}" if isinstance(value, float) else "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
            lines.append(f"{r['input']}: {shown}")
    return "\n".join(lines)


# ---------------------------------------------------------------- reading inputs


def read_inputs(
    inputs: str | Path | np.ndarray | Sequence[str | Path],
    input_shape: Sequence[int],
    input_scale: float = 1.0,
    *,
    resize: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """All samples of ``inputs`` as one float32 batch shaped (N, *input_shape), and a label per sample."""
    shape = tuple(int(d) for d in input_shape)
    if not isinstance(inputs, (str, Path, np.ndarray, list, tuple)):
        import torch

        if torch.is_tensor(inputs):  # a tensor is one array, as a NumPy array is
            inputs = inputs.detach().cpu()
            inputs = (inputs.float() if inputs.dtype == torch.bfloat16 else inputs).numpy()
    if isinstance(inputs, np.ndarray):
        batch, _ = _from_array(inputs, shape, input_scale, "array")
        return batch, [f"array[{i}]" for i in range(len(batch))]
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    batches, labels = [], []
    for item in inputs:
        path = Path(item)
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        kind = input_kind(path)
        if kind == "image":
            batches.append(_read_image(path, shape, resize)[None])
            labels.append(str(path))
        elif kind == "csv":
            rows, lines = _read_csv(path, shape)
            batches.append(rows)
            labels += [f"{path}:{line}" for line in lines]
        else:
            batch, single = _from_array(_read_array(path, kind), shape, input_scale, str(path), resize)
            batches.append(batch)
            labels += [str(path)] if single else [f"{path}[{i}]" for i in range(len(batch))]
    if not batches:
        raise UsageError("no inputs given; pass image, IDX, .npy or .csv files")
    return np.concatenate(batches).astype(np.float32, copy=False), labels


def input_kind(path: Path) -> str:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(IMAGE_SUFFIXES) and not name.endswith(".gz"):
        return "image"
    if base.endswith(".npy") and not name.endswith(".gz"):
        return "npy"
    if base.endswith(".csv") and not name.endswith(".gz"):
        return "csv"
    if base.endswith(("-ubyte", ".idx", "ubyte")) or ".idx" in base:
        return "idx"
    raise UsageError(f"{path}: unknown input type {''.join(path.suffixes) or '(no suffix)'!r}; predict reads {READS}")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _read_image(path: Path, shape: tuple[int, ...], resize: bool) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading images needs Pillow: pip install 'etappe[images]'") from None
    if len(shape) != 3:
        raise UsageError(f"{path}: the model expects inputs shaped {_shape_text(shape)}, not images (C x H x W); "
                         "pass .npy or .csv inputs")
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            img = Image.open(path)  # reads the header only
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{path}: image is {img.width}x{img.height}, {img.width * img.height} pixels, more "
                                f"than the {MAX_PIXELS} predict reads; scale it down first")
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the image: {exc}") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    found_channels = len(img.getbands())
    found = (found_channels, img.height, img.width)
    if found != shape:
        if not resize:
            raise UsageError(
                f"{path}: image is {_shape_text(found)} (channels x height x width, mode {img.mode}), the model "
                f"expects {_shape_text(shape)}; pass --resize to convert and resize it"
            )
        if found_channels != channels:
            modes = {1: "L", 3: "RGB", 4: "RGBA"}
            if channels not in modes:
                raise UsageError(f"{path}: cannot convert an image to {channels} channels (1, 3 or 4 can be made)")
            img = img.convert(modes[channels])
        if (img.height, img.width) != (height, width):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255
    elif array.dtype in (np.uint16, np.int32) and img.mode.startswith("I"):
        array = array.astype(np.float32) / 65535
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return array


def _read_array(path: Path, kind: str) -> np.ndarray:
    if kind == "npy":
        try:
            _check_npy_size(path)
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: cannot read it as a NumPy .npy array: {exc}") from None
    from etappe.data.idx import read_idx

    return read_idx(path)


def _check_npy_size(path: Path) -> None:
    """A .npy header's shape and type must account for exactly the bytes that follow it: numpy allocates what the
    header declares before reading, so a 100-byte file declaring 10**10 values would ask for 75 GB."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        start, size = f.tell(), path.stat().st_size
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and start + declared != size:
        raise DataError(f"{path}: .npy header declares shape {tuple(shape)} of {dtype} ({start + declared} bytes with "
                        f"header), but the file holds {size} bytes")


def _from_array(
    array: np.ndarray, shape: tuple[int, ...], scale: float, where: str, resize: bool = False
) -> tuple[np.ndarray, bool]:
    """A batch shaped (N, *shape) from one sample or a batch, and whether it was one sample. Integer values are
    raw stored data, scaled by ``scale``."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected numbers, found an array of {array.dtype}")
    values = array.astype(np.float32) * np.float32(scale) if array.dtype.kind in "biu" else array.astype(np.float32)
    size = math.prod(shape)
    if values.shape == shape:
        return values[None], True
    if shape[:1] == (1,) and values.shape == shape[1:]:  # one grey image without its channel axis
        return values[None, None], True
    if values.ndim >= 1:
        rest = values.shape[1:]
        if rest == shape:
            return values, False
        if shape[:1] == (1,) and rest == shape[1:]:  # a batch of grey images (IDX: N x H x W)
            return values[:, None], False
        if rest == (size,):  # flattened rows
            return values.reshape(len(values), *shape), False
    hint = " (--resize applies to images only)" if resize else ""
    raise UsageError(
        f"{where}: array shaped {_shape_text(values.shape)} does not fit the model, which expects one sample "
        f"shaped {_shape_text(shape)} or a batch N x {_shape_text(shape)}{hint}"
    )


def _read_csv(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    size = math.prod(shape)
    # A row of ``size`` numbers needs no more characters than this; a longer line is refused before it is split,
    # so that neither a row of millions of values nor one huge field is ever materialised.
    longest = size * 40 + 4096
    rows, lines = [], []
    with open(path, newline="") as f:
        for number, line in enumerate(iter(lambda: f.readline(longest + 1), ""), start=1):
            if len(line) > longest:
                raise UsageError(f"{path}:{number}: expected {size} values per row (one sample shaped "
                                 f"{_shape_text(shape)}), found a row of more than {longest} characters")
            try:
                row = next(csv.reader([line]), [])
            except csv.Error as exc:
                raise DataError(f"{path}:{number}: not a CSV row: {exc}") from None
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            try:
                values = [float(c) for c in cells]
            except ValueError:
                if not rows and number == 1:
                    continue  # a header row
                raise DataError(f"{path}:{number}: expected numbers, found {','.join(cells)[:60]!r}") from None
            if len(values) != size:
                raise UsageError(f"{path}:{number}: expected {size} values per row (one sample shaped "
                                 f"{_shape_text(shape)}), found {len(values)}")
            rows.append(values)
            lines.append(number)
    if not rows:
        raise DataError(f"{path}: no rows of numbers found")
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), *shape), lines
