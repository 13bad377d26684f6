"""TensorRT on the export side: the engine builder (builder), an ONNX bundle -> a verified TensorRT bundle
(from_onnx, which runs without torch, on the target), and the trtexec lines that rebuild and time a bundle (trtexec)."""
