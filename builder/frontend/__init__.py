"""The OpenAI-compatible HTTP frontend: a gRPC client of the Triton server (builder.client)."""
