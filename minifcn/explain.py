"""Explanations computed from the code: the convolution matrix, FCN geometry, size formulas.

Nothing here is typed in from the paper: every number is obtained by running
minifcn's own layers or reading its models, so the explanation and the
implementation cannot drift apart.

* :func:`conv_matrix` builds the matrix ``C`` of a convolution by pushing unit
  vectors through :func:`~minifcn.layers.conv.conv2d_forward`;
  :func:`transposed_conv_demo` checks that ``ConvTranspose2d`` computes ``C^T y``
  and that ``Conv2d.backward`` computes the same ``C^T dy``.
* :func:`fcn_table` lists every blob of an FCN (shape, stride, receptive field,
  crop offset) and derives each crop offset from the coordinate maps of the layers.
* :func:`size_report` and :func:`transposed_output_sizes` spell out the output-size
  formulas and why transposed convolution needs ``output_padding``.

Run them from the command line: ``minifcn explain conv-matrix``, ``minifcn explain fcn``,
``minifcn explain sizes``; ``minifcn explain routes`` (:mod:`minifcn.explain_routes`) says
which route, textbook or fast, every layer and pass of an FCN runs, and why.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .layers import Add, Conv2d, ConvTranspose2d, Crop, Dropout, MaxPool2d, ReLU, Scale
from .layers.conv import conv2d_forward
from .layers.columns import conv_output_size, conv_transpose_output_size
from .layers._checks import pair

# --------------------------------------------------------------------------- the convolution matrix


def conv_matrix(in_shape, weight, stride=1, padding=0, dilation=1) -> np.ndarray:
    """The matrix ``C`` with ``conv2d(x).ravel() == C @ x.ravel()`` (no bias).

    Column ``j`` of ``C`` is the convolution of the ``j``-th unit image, so ``C``
    is built by running :func:`conv2d_forward` on all unit images at once (as
    one batch).

    Inputs:
        in_shape: (C, H, W) of one input image.
        weight: (Cout, C, kh, kw) convolution weight (float64 for exact checks).
        stride, padding, dilation: ints or (h, w) pairs.
    Returns:
        C: (Cout * OH * OW, C * H * W), in the dtype of ``weight``; rows and
        columns in C-order (channel, row, column) of the output and the input.
    """
    c, h, w = (int(v) for v in in_shape)
    weight = np.asarray(weight)
    if weight.ndim != 4 or weight.shape[1] != c:
        raise ValueError(f"conv_matrix: weight must be (Cout, {c}, kh, kw) for in_shape {tuple(in_shape)}, "
                         f"got {weight.shape}")
    in_size = c * h * w
    units = np.eye(in_size, dtype=weight.dtype).reshape(in_size, c, h, w)  # batch of unit images
    y = conv2d_forward(units, weight, pair(stride, "stride", 1), pair(padding, "padding", 0),
                       pair(dilation, "dilation", 1))
    return y.reshape(in_size, -1).T.copy()  # column j = C e_j


@dataclass
class TransposedConvDemo:
    """What :func:`transposed_conv_demo` found.

    Attributes:
        C: (out_size, in_size) convolution matrix.
        in_shape, out_shape: (C, H, W) of the convolution's input and output.
        output_padding: (h, w) the ConvTranspose2d needs to map back to ``in_shape``.
        adjoint_err: ``|<C x, y> - <x, C^T y>|`` for random x, y.
        transpose_err: ``max |ConvTranspose2d(y) - C^T y|`` (same weight, same geometry).
        backward_err: ``max |Conv2d.backward(dy) - C^T dy|``.
        transpose_backward_err: ``max |ConvTranspose2d.backward(dz) - C dz|``.
    """

    C: np.ndarray
    in_shape: tuple
    out_shape: tuple
    output_padding: tuple
    adjoint_err: float
    transpose_err: float
    backward_err: float
    transpose_backward_err: float

    @property
    def max_err(self) -> float:
        return max(self.adjoint_err, self.transpose_err, self.backward_err, self.transpose_backward_err)

    def __str__(self) -> str:
        return "\n".join([
            f"convolution {self.in_shape} -> {self.out_shape}: C is {self.C.shape[0]} x {self.C.shape[1]}",
            f"ConvTranspose2d with the same weight needs output_padding={self.output_padding} to return to "
            f"{self.in_shape[1:]}",
            f"  |<C x, y> - <x, C^T y>|                   = {self.adjoint_err:.1e}",
            f"  max |ConvTranspose2d(y)     - C^T y|      = {self.transpose_err:.1e}",
            f"  max |Conv2d.backward(dy)    - C^T dy|     = {self.backward_err:.1e}",
            f"  max |ConvTranspose2d.backward(dz) - C dz| = {self.transpose_backward_err:.1e}",
        ])


def transposed_conv_demo(in_shape=(1, 4, 4), weight=None, stride=1, padding=0, dilation=1, seed=0,
                         verbose=False) -> TransposedConvDemo:
    """Check, in float64, that transposed convolution is multiplication by ``C^T``.

    Builds ``C`` with :func:`conv_matrix`, then with the *same* weight array:

    * ``ConvTranspose2d(Cout, C, k, stride, padding, output_padding)`` applied to
      ``y`` equals ``C^T y`` (PyTorch's transposed weight layout (in, out, kh, kw)
      is exactly the convolution's (out, in, kh, kw));
    * ``Conv2d.backward(dy)``, the input gradient, equals ``C^T dy``;
    * ``ConvTranspose2d.backward(dz)`` equals ``C dz``.

    Inputs:
        in_shape: (C, H, W); weight: (Cout, C, kh, kw) or None for integer weights
            1, 2, 3, ... (one output channel, kernel 3x3).
    Returns:
        :class:`TransposedConvDemo` (all errors about 1e-15); printed if ``verbose``.
    """
    c, h, w = (int(v) for v in in_shape)
    if weight is None:
        weight = np.arange(1, 1 + c * 9, dtype=np.float64).reshape(1, c, 3, 3)
    weight = np.asarray(weight, dtype=np.float64)
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    cout, _, kh, kw = weight.shape
    rng = np.random.default_rng(seed)
    C = conv_matrix((c, h, w), weight, stride, padding, dilation)

    conv = Conv2d(c, cout, (kh, kw), stride, padding, dilation, bias=False, dtype=np.float64)
    conv.weight.data[...] = weight
    x = rng.standard_normal((1, c, h, w))
    y = conv(x)
    out_shape = tuple(y.shape[1:])
    assert np.allclose(y.ravel(), C @ x.ravel(), atol=1e-12)  # C really is the convolution

    natural = [conv_transpose_output_size(y.shape[2 + a], weight.shape[2 + a], stride[a], padding[a], 0, dilation[a])
               for a in (0, 1)]
    output_padding = (h - natural[0], w - natural[1])
    tconv = ConvTranspose2d(cout, c, (kh, kw), stride, padding, output_padding, dilation, bias=False,
                            dtype=np.float64)
    tconv.weight.data[...] = weight  # the same array: (in, out, kh, kw) of the transpose = (out, in, kh, kw)

    v = rng.standard_normal(y.shape)
    adjoint = abs(float((C @ x.ravel()) @ v.ravel()) - float(x.ravel() @ (C.T @ v.ravel())))
    t_out = tconv(v)
    transpose_err = float(np.abs(t_out.ravel() - C.T @ v.ravel()).max())
    backward_err = float(np.abs(conv.backward(v).ravel() - C.T @ v.ravel()).max())
    dz = rng.standard_normal(t_out.shape)
    transpose_backward_err = float(np.abs(tconv.backward(dz).ravel() - C @ dz.ravel()).max())
    demo = TransposedConvDemo(C, (c, h, w), out_shape, output_padding, adjoint, transpose_err, backward_err,
                              transpose_backward_err)
    if verbose:
        print(demo)
    return demo


def format_matrix(m, width=None) -> str:
    """A small matrix as text, integers without decimals, zeros as '.'."""
    m = np.asarray(m)
    cells = [["." if v == 0 else (f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}") for v in row] for row in m]
    width = width or max(len(c) for row in cells for c in row)
    return "\n".join(" ".join(c.rjust(width) for c in row) for row in cells)


# --------------------------------------------------------------------------- FCN geometry

def _affine_of(layer):
    """Map of one layer from its output coordinate ``u`` to its input coordinate: ``(a, b)`` with ``a u + b``.

    The coordinate of a unit is the centre of its window. A convolution or
    pooling with kernel k, stride s, padding p, dilation d reads input rows
    ``s u - p .. s u - p + d (k - 1)``: centre ``s u + (d (k-1) / 2 - p)``.
    A transposed convolution is the reverse map: ``(v + p - d (k-1) / 2) / s``.
    Layers that keep the grid (ReLU, Dropout, Scale) map ``u -> u``.
    """
    if isinstance(layer, (Conv2d, MaxPool2d)):
        k, s, p, d = layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.dilation[0]
        return Fraction(s), Fraction(d * (k - 1), 2) - p
    if isinstance(layer, ConvTranspose2d):
        k, s, p, d = layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.dilation[0]
        return Fraction(1, s), (p - Fraction(d * (k - 1), 2)) / s
    if isinstance(layer, (ReLU, Dropout, Scale)):
        return Fraction(1), Fraction(0)
    raise TypeError(f"no coordinate rule for {type(layer).__name__}")


def _compose(parent, child):
    """Input coordinate of a child unit: parent map (A, B) after child map (a, b)."""
    (A, B), (a, b) = parent, child
    return A * a, A * b + B


def _map_text(ab) -> str:
    a, b = ab
    return ("u" if a == 1 else f"{_num(a)} u") + ("" if b == 0 else f" {'+' if b > 0 else '-'} {_num(abs(b))}")


def coordinate_maps(model, check: bool = True):
    """Where each blob's units sit on the input: name -> ``(a, b)``, input row = ``a u + b``.

    Computed along the height axis (every FCN layer is square-symmetric).

    Crops follow the model's own offsets. The maps are exact fractions; a
    correct FCN gives the two inputs of every fusion the same map, and the final
    ``score`` the identity map ``(1, 0)``. With ``check`` (default) a fusion of
    misaligned blobs raises ValueError; without, the fusion takes its first input's map.
    """
    maps = {"data": (Fraction(1), Fraction(0))}
    for name, *inputs in model.wiring():  # forward order: every input is mapped before it is used
        layer, parent = getattr(model, name), maps[inputs[0]]
        if isinstance(layer, Crop):
            maps[name] = _compose(parent, (Fraction(1), Fraction(layer.offset[0])))
        elif isinstance(layer, Add):
            other = inputs[1]
            if check and parent != maps[other]:
                raise ValueError(f"{name} adds misaligned blobs: unit u of {inputs[0]} sits on input row "
                                 f"{_map_text(parent)}, unit u of {other} on {_map_text(maps[other])}")
            maps[name] = parent
        else:
            maps[name] = _compose(parent, _affine_of(layer))
    return maps


def derived_crop_offsets(model):
    """Crop name -> offset that aligns the cropped blob with its reference, from the coordinate maps alone.

    For a crop of blob ``src`` against reference ``ref``: unit ``u`` of the
    result must sit where unit ``u`` of ``ref`` sits, so
    ``a_src (u + o) + b_src = a_ref u + b_ref``, hence ``a_src == a_ref`` and
    ``o = (b_ref - b_src) / a_src``. (Caffe's ``coord_map.crop`` computes the same.)
    """
    maps = coordinate_maps(model, check=False)
    out = {}
    for crop, source, ref in (b for b in model.wiring() if isinstance(getattr(model, b[0]), Crop)):
        (a_s, b_s), (a_r, b_r) = maps[source], maps[ref]
        if a_s != a_r:
            raise ValueError(f"{crop}: scales differ ({a_s} vs {a_r}); no crop can align them")
        o = (b_r - b_s) / a_s
        if o.denominator != 1:
            raise ValueError(f"{crop}: the alignment offset {o} is not an integer")
        out[crop] = int(o)
    return out


@dataclass
class TableRow:
    """One blob of :func:`fcn_table`."""

    blob: str
    layer: str
    shape: tuple            # (C, H, W)
    stride: float           # input pixels per step of this blob
    receptive_field: float  # input pixels seen by one unit (one side)
    crop_offset: int | None  # the model's offset (crops only)
    derived_offset: int | None  # the offset the coordinate maps demand (crops only)
    coord: tuple            # (a, b): unit u sits on input row a u + b


def fcn_table(model_name="fcn8s", height=500, width=None, model_width=0.125, num_classes=21, model=None):
    """The layer-by-layer table of an FCN for an input of ``height x width``.

    Built from :func:`minifcn.models.trace.fcn_blobs` (shapes, strides, receptive
    fields) and :func:`coordinate_maps` (alignment) of a real model.

    Args:
        model_name: 'fcn32s', 'fcn16s', 'fcn8s' or 'fcn8s-atonce'.
        height, width: input size (width defaults to height).
        model_width: channel multiplier of the model that is built (the geometry
            does not depend on it; 1.0, the paper's channels, takes seconds to build).
        model: an already built FCN (then model_name, model_width, num_classes are ignored).
    Returns:
        list of :class:`TableRow`, input first, ``score`` (the output) last.
    """
    from .models import build_model  # noqa: PLC0415 (explain is not imported by models)
    from .models.trace import fcn_blobs  # noqa: PLC0415

    if model is None:
        model = build_model(model_name, num_classes=num_classes, width=model_width)
    maps = coordinate_maps(model, check=False)
    derived = derived_crop_offsets(model)
    rows = []
    for b in fcn_blobs(model, height, width):
        layer = getattr(model, b.name, None)
        offset = layer.offset[0] if isinstance(layer, Crop) else None
        rows.append(TableRow(b.name, b.layer, tuple(b.shape), b.stride, b.receptive_field, offset,
                             derived.get(b.name), maps[b.name]))
    return rows


def _num(v) -> str:
    v = Fraction(v).limit_denominator(1 << 20) if not isinstance(v, Fraction) else v
    return str(v.numerator) if v.denominator == 1 else (f"{float(v):g}" if v.denominator in (2, 4, 8, 16, 32) else str(v))


def format_fcn_table(rows, skip_activations=True) -> str:
    """:func:`fcn_table` rows as aligned text (ReLU and Dropout rows left out by default)."""
    header = ("blob", "layer", "C x H x W", "stride", "RF", "input row of unit u", "crop offset (derived)")
    table = [header]
    for r in rows:
        if skip_activations and r.layer in ("ReLU", "Dropout"):
            continue
        coord = _map_text(r.coord)
        crop = "" if r.crop_offset is None else f"{r.crop_offset} ({r.derived_offset})"
        table.append((r.blob, r.layer, " x ".join(str(s) for s in r.shape), _num(r.stride),
                      _num(r.receptive_field), coord, crop))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- sizes

def transposed_output_sizes(in_size, kernel, stride=1, padding=0, dilation=1):
    """Every output length a transposed convolution may produce from ``in_size``, with its ``output_padding``.

    A convolution rounds down, so up to ``stride`` input lengths convolve to the
    same ``in_size``; its transpose must be told which one to produce. Returns
    ``[(out_size, output_padding), ...]``: exactly the lengths ``L >= 1`` with
    ``conv_output_size(L, kernel, stride, padding, dilation) == in_size``,
    obtained as ``conv_transpose_output_size(in_size, ...) + output_padding`` for
    ``output_padding = 0 .. stride - 1``.
    """
    natural = conv_transpose_output_size(in_size, kernel, stride, padding, 0, dilation)
    out = []
    for op in range(stride):
        size = natural + op
        span = dilation * (kernel - 1) + 1
        if size >= 1 and size + 2 * padding >= span and \
                conv_output_size(size, kernel, stride, padding, dilation) == in_size:
            out.append((size, op))
    return out


def _check_geometry(command, size, kernel, stride, padding, dilation):
    """Refuse a geometry the formulas cannot take, naming the option and the value."""
    for name, value, least in (("size", size, 1), ("kernel", kernel, 1), ("stride", stride, 1),
                               ("padding", padding, 0), ("dilation", dilation, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"explain {command}: --{name} must be an integer >= {least}, got {value!r}")


def size_report(size, kernel, stride=1, padding=0, dilation=1) -> str:
    """The two size formulas with the numbers put in, and the output_padding story, as text."""
    _check_geometry("sizes", size, kernel, stride, padding, dilation)
    k, s, p, d = kernel, stride, padding, dilation
    lines = []
    num = size + 2 * p - d * (k - 1) - 1
    conv = conv_output_size(size, k, s, p, d)
    lines.append(f"Convolution (kernel {k}, stride {s}, padding {p}, dilation {d}) of a {size}-pixel side:")
    lines.append("  out = floor((in + 2p - d(k-1) - 1) / s) + 1")
    lines.append(f"      = floor(({size} + 2*{p} - {d}*({k}-1) - 1) / {s}) + 1 = floor({num} / {s}) + 1 = {conv}")
    if conv >= 1:
        back = transposed_output_sizes(conv, k, s, p, d)
        natural = conv_transpose_output_size(conv, k, s, p, 0, d)
        lines.append(f"Its transpose (same kernel, stride, padding) of a {conv}-pixel side:")
        lines.append("  out = (in - 1)s - 2p + d(k-1) + output_padding + 1")
        lines.append(f"      = ({conv} - 1)*{s} - 2*{p} + {d}*({k}-1) + output_padding + 1 = {natural} + output_padding")
        lines.append(f"  sides that convolve to {conv}: " +
                     ", ".join(f"{L} (output_padding={op})" for L, op in back))
        match = [op for L, op in back if L == size]
        lines.append(f"  so returning to {size} needs output_padding={match[0]}" if match else
                     f"  {size} is not among them")
    tsizes = transposed_output_sizes(size, k, s, p, d)
    natural = conv_transpose_output_size(size, k, s, p, 0, d)
    lines.append(f"Transposed convolution of a {size}-pixel side:")
    lines.append(f"  out = ({size} - 1)*{s} - 2*{p} + {d}*({k}-1) + output_padding + 1 = {natural} + output_padding")
    if tsizes:
        lines.append(f"  valid outputs (their convolution gives back {size}): " +
                     ", ".join(f"{L} (output_padding={op})" for L, op in tsizes))
    else:
        lines.append(f"  no output side convolves back to {size} (padding removes too much)")
    if s > 1:
        lines.append(f"  stride {s} rounds {s} input sides down to one output side; output_padding "
                     f"(0..{s - 1}) says which one the transpose should produce.")
    return "\n".join(lines)


def conv_matrix_report(size=4, kernel=3, stride=2, padding=1, dilation=1) -> str:
    """``minifcn explain conv-matrix``: the matrix C of a one-channel convolution with weights 1..k*k and the identities."""
    _check_geometry("conv-matrix", size, kernel, stride, padding, dilation)
    weight = np.arange(1, kernel * kernel + 1, dtype=np.float64).reshape(1, 1, kernel, kernel)
    demo = transposed_conv_demo((1, size, size), weight, stride, padding, dilation)
    oh, ow = demo.out_shape[1:]
    lines = [f"Kernel ({kernel}x{kernel}, weights 1..{kernel * kernel}):", format_matrix(weight[0, 0]), "",
             f"Convolution of a {size}x{size} image, stride {stride}, padding {padding}, dilation {dilation} "
             f"-> {oh}x{ow}.",
             f"As a matrix: y = C x with x the {size * size} pixels row by row and y the {oh * ow} outputs.",
             f"C ({demo.C.shape[0]} x {demo.C.shape[1]}; row r = where output r reads, '.' = 0):",
             format_matrix(demo.C), "",
             "Transposed convolution with the same weight is C^T: column r of C^T stamps the kernel onto",
             "the input grid for output r; overlapping stamps add.",
             str(demo)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- FCN-8s, stage by stage

def fcn8s_streams(model, x):
    """Split an FCN-8s's output into the three streams it adds, at full resolution.

    Every upsampling layer of FCN-8s is linear (a transposed convolution without
    bias) and so are the crops, so the output is exactly a sum::

        output = crop31(upscore8(upscore_pool4(upscore2(score_fr))))       A: stride 32
               + crop31(upscore8(upscore_pool4(score_pool4c)))             B: stride 16
               + crop31(upscore8(score_pool3c))                            C: stride 8

    Each stream is the model's own wiring run with the other skip terms set
    to zero (only the head is run again).

    Inputs: x (N, 3, H, W) in the model's dtype (call ``model.eval()`` first).
    Returns: ``(A, B, C, output)``, each (N, K, H, W); ``output`` equals ``model(x)``
    and ``A + B + C`` equals it up to rounding.
    """
    from .models.fcn import FCN8s  # noqa: PLC0415

    if not isinstance(model, FCN8s):
        raise TypeError(f"fcn8s_streams: needs an FCN-8s, got {type(model).__name__}")
    model.check_input(x)
    blobs = model.forward_blobs(x)
    streams = [model.forward_blobs(x, zero=zero, given=blobs)["score"] for zero in (
        ("score_pool4c", "score_pool3c"),   # A: upscore2 alone reaches fuse_pool4 and fuse_pool3
        ("upscore2", "score_pool3c"),       # B: score_pool4c alone
        ("upscore_pool4",))]                # C: score_pool3c alone
    return (*streams, blobs["score"])


def fcn8s_stage_scores(model, x):
    """Class scores of an FCN-8s after each stage of fusion: ``{'32s', '16s', '8s'}`` -> (N, K, H, W).

    With the streams A, B, C of :func:`fcn8s_streams`:

    * ``'32s'`` = A + mean(B) + mean(C): the coarse stream (score_fr) alone;
    * ``'16s'`` = A + B + mean(C): after fusing pool4 (fuse_pool4, upsampled);
    * ``'8s'``  = the output, A + B + C.

    ``mean`` is each image's and class's spatial mean. How constant offsets are
    split between the streams is arbitrary (the biases of score_fr, score_pool4
    and score_pool3 can trade off without changing the sum), so a stage keeps
    the finer streams' averages and leaves out only their spatial detail.
    """
    a, b, c, output = fcn8s_streams(model, x)

    def mean(t):
        return t.mean(axis=(2, 3), keepdims=True)

    return {"32s": a + mean(b) + mean(c), "16s": a + b + mean(c), "8s": output}
