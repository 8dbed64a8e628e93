"""gncodegen: specialized C, CUDA and firmware sources for MATLAB-style group normalization
layers, verified against a float64 reference.

    import gncodegen
    lib = gncodegen.compile(gncodegen.load("spec.yaml"))
    y = lib["layer_name"](x)
"""

__version__ = "0.1.0"

from .api import ArgumentError, CompiledLayer, Library, compile, load  # noqa: E402

__all__ = ["__version__", "load", "compile", "Library", "CompiledLayer", "ArgumentError"]
