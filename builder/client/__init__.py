"""Clients of a served engine over gRPC: no torch, no runtime."""
