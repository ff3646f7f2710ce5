"""Hand-written layers, each with an explicit forward and backward.

All take batched (N, C, H, W) float32 or float64 arrays on NumPy or CuPy.
"""
from .activation import Dropout, ReLU
from .conv import Conv2d, ConvTranspose2d, conv2d_forward, conv2d_input_grad, conv2d_weight_grad
from .fuse import Add, Concat, Crop, Scale
from .columns import col2im, conv_output_size, conv_transpose_output_size, im2col
from .init import bilinear_kernel, he_normal, upsample_filt
from .loss import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from .pool import MaxPool2d, pool_output_size
from .upsample import Upsample, interpolation_matrix

__all__ = [
    "Add", "Concat", "Conv2d", "ConvTranspose2d", "Crop", "Dropout", "MaxPool2d", "ReLU", "Scale",
    "SigmoidBinaryCrossEntropy", "SoftmaxCrossEntropy", "Upsample",
    "bilinear_kernel", "col2im", "conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad",
    "conv_output_size", "conv_transpose_output_size", "he_normal", "im2col", "interpolation_matrix",
    "pool_output_size", "upsample_filt",
]
