"""Model families; importing registers them."""

from modformer.models import gpt  # noqa: F401
