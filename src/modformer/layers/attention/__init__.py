"""Attention variants and the shared kernel dispatcher."""
