"""File formats and the runtimes that run them: our `.safetensors` checkpoints (checkpoint.py), diffusers
UNet2DModel folders (diffusers_format.py), ONNX export and ONNX Runtime (onnx_export.py, onnx.py),
TensorRT plans (tensorrt.py), sample outputs (images.py), and `open_checkpoint`, which picks one by the
path (opener.py). export/ builds the .onnx and .plan files; these load them."""
