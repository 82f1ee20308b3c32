"""Compute kernels: plain references, CPU paths and Triton kernels."""
