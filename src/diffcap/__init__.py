"""diffcap: image captioning with a continuous diffusion language model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Captioner", "Config", "__version__"]

if TYPE_CHECKING:
    from diffcap.captioner import Captioner
    from diffcap.config import Config


def __getattr__(name: str) -> Any:  # lazy: `import diffcap` stays fast and torch-free
    if name == "Captioner":
        from diffcap.captioner import Captioner

        return Captioner
    if name == "Config":
        from diffcap.config import Config

        return Config
    raise AttributeError(name)
