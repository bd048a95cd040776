"""Deployment artifacts made from an engine: the vision ONNX, the TensorRT-LLM checkpoint and its
trtllm-build driver, and a Hugging Face checkpoint of our modules."""
