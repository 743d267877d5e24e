"""The environment every process lion-local starts gets, so that nothing reaches the network.

Models are local paths; these variables make the Hugging Face libraries, vLLM and W&B fail
fast (or stay local) instead of trying to download or report anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "offline",
}


def offline_environ(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of `base` (default: this process's environment) with the offline variables set."""
    environment = dict(os.environ if base is None else base)
    environment.update(OFFLINE_ENVIRONMENT)
    environment.update(extra)
    return environment
