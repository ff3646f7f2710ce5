"""FCN-32s/16s/8s on a VGG16 backbone, and a small encoder-decoder."""
import numpy as np

from .encoder_decoder import EncoderDecoder
from .fcn import MODELS, FCN8s, FCN8sAtOnce, FCN16s, FCN32s, FCNBase
from .vgg import vgg16_layers
from .weights import load_vgg16_npz, transfer_by_name, transfer_state, vgg16_to_fcn_state

MODEL_NAMES = (*MODELS, "encoder-decoder")


def build_model(name: str, num_classes: int = 21, width: float = 1.0, **kwargs):
    """Build a model by name: 'fcn32s', 'fcn16s', 'fcn8s', 'fcn8s-atonce' or 'encoder-decoder'."""
    key = name.lower().replace("_", "-")
    if key == "encoder-decoder":  # width 1.0 = 64 channels in the first stage, as VGG
        return EncoderDecoder(num_classes=num_classes, base_width=max(1, int(round(64 * width))),
                              dtype=kwargs.get("dtype", np.float32), seed=kwargs.get("seed", 0))
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[key](num_classes=num_classes, width=width, **kwargs)


__all__ = ["EncoderDecoder", "FCN8s", "FCN8sAtOnce", "FCN16s", "FCN32s", "FCNBase", "MODELS", "MODEL_NAMES",
           "build_model", "load_vgg16_npz", "transfer_by_name", "transfer_state", "vgg16_layers", "vgg16_to_fcn_state"]
