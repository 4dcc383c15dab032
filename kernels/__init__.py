"""Fused adapter linears and the attention backend choice."""
