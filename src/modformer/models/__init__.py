"""Model families; importing registers them."""

from modformer.models import gpt, hourglass  # noqa: F401
