"""gncodegen: specialized C and CUDA for MATLAB-style group normalization layers."""

__version__ = "0.1.0"
