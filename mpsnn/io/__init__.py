"""Import and export: ``mpsnn.io.onnx`` loads ONNX models into an MPSNNGraph (needs the
optional ``onnx`` package: ``pip install 'mpsnn[onnx]'``)."""
