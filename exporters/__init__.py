"""ONNX export with QuantizeLinear/DequantizeLinear nodes.

Not implemented yet: this package is reserved for the exporters (INT4/INT8 weights, INT8
activations, parity checks, onnxruntime-only sampler). Importing a submodule fails until then.
"""
