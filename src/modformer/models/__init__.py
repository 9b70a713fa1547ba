"""Model families; importing registers them."""

from modformer.models import gpt, hourglass  # noqa: F401
from modformer.models.hf import data as _hf_data  # noqa: F401,E402  (registers the corpus hf_text)
