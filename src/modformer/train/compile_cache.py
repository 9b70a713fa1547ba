"""A persistent torch.compile cache: Inductor's compiled kernels and FX graphs under ~/.cache/modformer/inductor.

Inductor's default cache folder is /tmp/torchinductor_<user>, which a reboot or a /tmp cleaner empties, and with it
every compiled kernel (a cold start recompiles: tens of seconds for a small GPT). ``use_persistent_cache`` points
``TORCHINDUCTOR_CACHE_DIR`` at modformer's cache folder ($MODFORMER_CACHE, else ~/.cache/modformer) unless the user
(or a benchmark that wants a cold start) has set it. Triton's own cache (~/.triton/cache) is already persistent.
"""

from __future__ import annotations

import os
from pathlib import Path


def use_persistent_cache() -> Path:
    """Set ``TORCHINDUCTOR_CACHE_DIR`` to ``<modformer cache>/inductor`` if unset; return the folder in use."""
    from modformer.data.files import cache_dir

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
