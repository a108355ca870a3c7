"""Runtimes that run an exported U-Net as the sampler's eps model: ONNX Runtime (`onnx`) and
TensorRT (`tensorrt`). export/ builds the files; these load them
(engine.cli.open_checkpoint picks one by the file's suffix)."""
