"""Weight transfer: torchvision-style VGG16 ImageNet weights, and FCN staging 32s -> 16s -> 8s.

Files are ``.npz`` archives read with ``allow_pickle=False``: loading a file
never runs code from it.
"""
from __future__ import annotations

import numpy as np

from .vgg import VGG16_STAGES

# torchvision's vgg16().features indices of the 13 convolutions, in order.
_TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def vgg16_name_map():
    """Map torchvision key prefixes to FCN layer names: ``features.0`` -> ``conv1_1`` ...,
    ``classifier.0`` -> ``fc6``, ``classifier.3`` -> ``fc7`` (``classifier.6``, fc8, is dropped)."""
    names = [f"conv{s}_{i}" for s, n, _ in VGG16_STAGES for i in range(1, n + 1)]
    mapping = {f"features.{k}": name for k, name in zip(_TORCHVISION_CONV_INDICES, names)}
    mapping.update({"classifier.0": "fc6", "classifier.3": "fc7"})
    return mapping


def vgg16_to_fcn_state(torchvision_state, model):
    """Convert a torchvision VGG16 state (name -> array) to ``model``'s parameter names.

    The fully connected fc6 (4096, 25088) becomes a 7x7 convolution
    (4096, 512, 7, 7) and fc7 (4096, 4096) a 1x1 one: the same numbers, so the
    convolution at one 7x7 window computes exactly the fully connected layer.
    """
    params = dict(model.named_parameters())
    out = {}
    for prefix, name in vgg16_name_map().items():
        for kind in ("weight", "bias"):
            key = f"{prefix}.{kind}"
            if key not in torchvision_state:
                raise KeyError(f"VGG16 weights: missing {key!r} (expected torchvision names such as "
                               f"'features.0.weight', 'classifier.0.weight')")
            target = params[f"{name}.{kind}"]
            value = np.asarray(torchvision_state[key])
            if value.size != target.size:
                raise ValueError(f"VGG16 weights: {key} has shape {value.shape} ({value.size} values) but "
                                 f"{name}.{kind} needs {tuple(target.shape)}; is the model's width 1.0?")
            out[f"{name}.{kind}"] = value.reshape(target.shape)
    return out


def load_vgg16_npz(model, path):
    """Copy ImageNet VGG16 weights (torchvision key names, ``.npz``) into an FCN model's backbone.

    Returns the list of parameter names that were set. Score layers and
    upsampling keep their FCN initialisation.
    """
    with np.load(path, allow_pickle=False) as archive:
        state = {k: archive[k] for k in archive.files}
    converted = vgg16_to_fcn_state(state, model)
    model.load_state_dict(converted, strict=False)
    return sorted(converted)


def transfer_state(state, target):
    """Staged training: copy into ``target`` every array of ``state`` (name -> array) whose name and shape
    match one of its parameters (FCN-32s -> FCN-16s -> FCN-8s).

    Returns ``(copied, new, mismatched)`` parameter names of ``target``: copied; absent from ``state`` (kept
    as initialised); present with another shape (kept as initialised).
    """
    copied, new, mismatched = [], [], []
    for name, p in target.named_parameters():
        if name not in state:
            new.append(name)
        elif tuple(state[name].shape) != tuple(p.shape):
            mismatched.append(name)
        else:
            copied.append(name)
    target.load_state_dict({name: state[name] for name in copied}, strict=False)
    return copied, new, mismatched


def transfer_by_name(source, target, skip=()):
    """:func:`transfer_state` from the parameters of the model ``source``, except those named in ``skip``.
    Returns the copied names."""
    state = {name: p.data for name, p in source.named_parameters() if name not in skip}
    return transfer_state(state, target)[0]
