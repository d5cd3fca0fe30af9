"""ONNX export with QuantizeLinear/DequantizeLinear nodes, and running the result in onnxruntime.

- :mod:`exporters.qdq_forms`: how a fake-quant layer is written as Q/DQ (torch side).
- :mod:`exporters.onnx_export`: ``gaq export`` (trace, INT4 narrowing, metadata, atomic write).
- :mod:`exporters.validate`: ``onnx.checker`` and onnxruntime-vs-torch parity, with its bound.
- :mod:`exporters.ort_runtime`, :mod:`exporters.ort_sampler`: onnxruntime sessions and the DDIM
  sampler, NumPy only (``gaq sample --onnx`` runs without torch).
- :mod:`exporters.openvino_runtime`, :mod:`exporters.runtimes`: OpenVINO sessions shaped like onnxruntime's,
  and the one function that opens either.
- :mod:`exporters.bench`: ``gaq bench`` (latency of FP32 / FP16 / quantize_static / gaq exports, NNCF's INT8 in OpenVINO).

Submodules are imported explicitly; this package imports nothing, so the torch-free path stays torch-free.
"""
