"""Triton Inference Server: the request/response protocol, model repositories, the tritonserver launcher."""
