"""Parameters and the Module base class shared by every layer and model.

A :class:`Module` has an explicit ``forward`` that keeps what its backward
needs, and an explicit ``backward(dy)`` that returns the input gradient and
*accumulates* (``+=``) into each parameter's ``.grad``. There is no autograd:
a model's backward calls its layers' backward in reverse order by hand.

``zero_grad`` has two routes (``minifcn explain routes`` names the one in force): the
textbook one writes zeros into every gradient at once; the ``lazy`` one only marks them
zero, so the first backward pass that reaches a parameter *stores* its contribution
instead of adding it (:meth:`Parameter.grad_for_backward`), and anyone else who reads
``.grad`` first gets the zeros written then. The same numbers, without one pass over
every gradient and one read of it per step (PyTorch's ``set_to_none`` saves the same).

The rule of the saved input (as in PyTorch): a layer may keep the array its
forward was given, without copying it, until its backward. Do not change that
array in place in between; change it after backward, or pass a copy. The
convolutions, which keep their inputs for the weight gradient, check a sample
of it in backward and raise RuntimeError if it changed
(:class:`minifcn.layers._checks.SavedInput`).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .backend import check_device, get_array_module, to_device
from .routes import register, run


class Parameter:
    """A learnable array and its gradient.

    Attributes:
        data: the array (NumPy or CuPy), any shape.
        grad: an array of the same shape and dtype; backward passes add into it.
            Assigning an array replaces it (the distributed buckets make it a view).
        trainable: False for parameters an optimiser must leave alone (for
            example FCN's fixed bilinear upsampling kernels).
        lr_mult, decay_mult: per-parameter multipliers of the optimiser's
            learning rate and weight decay (Caffe's ``param { lr_mult decay_mult }``).
    """

    def __init__(self, data, trainable: bool = True, lr_mult: float = 1.0, decay_mult: float = 1.0):
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)
        self.trainable = trainable
        self.lr_mult = float(lr_mult)
        self.decay_mult = float(decay_mult)

    @property
    def grad(self):
        if self._zeroed_lazily:  # zero_grad's lazy route: the zeros are written now, when first read
            self._grad[...] = 0
            self._zeroed_lazily = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad, self._zeroed_lazily = value, False

    def grad_for_backward(self):
        """``(grad, overwrite)``: the array a backward pass puts its contribution to the gradient in,
        and whether it must *store* it there (every element) rather than add it: True for the first
        pass after a lazy :meth:`zero_grad`, when the array still holds the last step's numbers."""
        overwrite, self._zeroed_lazily = self._zeroed_lazily, False
        return self._grad, overwrite

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    def zero_grad(self) -> None:
        """Make the gradient zero, by the route of :data:`ZERO_GRAD` in force (see the module docstring)."""
        run(ZERO_GRAD, (), self)

    def __repr__(self) -> str:
        flag = "" if self.trainable else ", fixed"
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}{flag})"


ZERO_GRAD = "zero_grad"


@register(ZERO_GRAD, "textbook", textbook=True, reason="zeros written into the gradient now")
def write_zeros(p: Parameter) -> None:
    p.grad[...] = 0


@register(ZERO_GRAD, "lazy", reason="the gradient marked zero: the first backward pass stores instead of adding, "
                                    "a reader before it gets the zeros written then")
def mark_zero(p: Parameter) -> None:
    p._zeroed_lazily = True


class Module:
    """Base class of layers and models.

    Sub-modules and parameters assigned as attributes are registered in
    assignment order, so ``named_parameters()`` yields names such as
    ``"conv1_1.weight"`` and ``state_dict()`` uses the same names.

    Subclasses implement ``forward(*inputs)`` and ``backward(dy)``.
    ``layer(x)`` is ``layer.forward(x)``.
    """

    training: bool = True

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_children", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_params")
        if params is None:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        params.pop(name, None)
        self._children.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    # -- the two methods every layer writes ---------------------------------
    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, *inputs, **kwargs):
        return self.forward(*inputs, **kwargs)

    # -- parameters and sub-modules -----------------------------------------
    def named_children(self):
        return iter(self._children.items())

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix: str = ""):
        for name, p in self._params.items():
            if p is not None:
                yield (f"{prefix}.{name}" if prefix else name), p
        for name, child in self._children.items():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.trainable or not trainable_only)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    # -- devices and dtypes --------------------------------------------------
    def to(self, device: str | None = None, dtype=None):
        """Move every parameter to ``device`` ('cpu' or 'gpu') and/or cast to ``dtype``."""
        device = check_device(device) if device is not None else None
        for p in self.parameters():
            data = p.data if device is None else to_device(p.data, device)
            if dtype is not None:
                data = data.astype(dtype, copy=False)
            if data is not p.data:
                p.data = data
                p.grad = get_array_module(data).zeros_like(data)
        return self

    def astype(self, dtype):
        return self.to(None, dtype)

    # -- state ---------------------------------------------------------------
    def state_dict(self):
        """Ordered mapping from parameter name to its array (not a copy)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state, strict: bool = True):
        """Copy arrays from ``state`` into the parameters of the same name.

        Shapes must match exactly. With ``strict=True`` every parameter must be
        present and no unknown name may appear; the error lists the names.
        Returns ``(missing, unexpected)`` name lists.
        """
        own = OrderedDict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        for name, p in own.items():
            if name not in state:
                continue
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"parameter {name!r}: expected shape {tuple(p.shape)}, got {tuple(value.shape)}"
                )
            xp = get_array_module(p.data)
            src = value if get_array_module(value) is xp else (
                xp.asarray(value) if xp is not np else np.asarray(value.get())
            )
            p.data[...] = src.astype(p.data.dtype, copy=False)
        return missing, unexpected

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._children.items():
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        if len(lines) == 1:
            return lines[0] + ")"
        return "\n".join(lines) + "\n)"


def input_grad_switch(first_layer: str, up_to_runs: bool = False):
    """A model property ``input_grad`` that turns the input gradient of its first layer on and off.

    True by default (gradient checks and saliency need it). Training sets it
    to False, as PyTorch skips the gradient of an input that does not require
    one: the first convolution's input-gradient product, often on the
    largest map of the network (FCN's padding 100), is never computed, and
    the model's ``backward`` returns None.

    ``up_to_runs``: the model's maps repeat lines for any parameters (FCN's
    padding), so with the input gradient off, every other convolution's dx only
    feeds parameter gradients and may be exact up to those runs
    (``Conv2d.input_grad_up_to_runs``, set and cleared here with the switch).
    """
    def get(self):
        return getattr(self, first_layer).input_grad

    def set(self, value):
        first = getattr(self, first_layer)
        first.input_grad = bool(value)
        if up_to_runs:
            for layer in self.modules():
                if hasattr(layer, "input_grad_up_to_runs") and layer is not first:
                    layer.input_grad_up_to_runs = not value

    return property(get, set, doc=f"Whether backward computes the input's gradient (at layer {first_layer}).")


class Sequential(Module):
    """Layers applied one after another; backward runs them in reverse.

    ``Sequential(("conv1", Conv2d(...)), ("relu1", ReLU()))`` names the
    children; ``Sequential(Conv2d(...), ReLU())`` numbers them ``0, 1, ...``.
    """

    def __init__(self, *layers):
        super().__init__()
        for i, item in enumerate(layers):
            name, layer = item if isinstance(item, tuple) else (str(i), item)
            setattr(self, name, layer)

    def forward(self, x):
        for layer in self._children.values():
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self._children.values()):
            dy = layer.backward(dy)
        return dy

    def __iter__(self):
        return iter(self._children.values())

    def __len__(self) -> int:
        return len(self._children)

    def __getitem__(self, index):
        if isinstance(index, str):
            return self._children[index]
        return list(self._children.values())[index]
