"""fashionshoot: garment-to-editorial fashion image generation.

Paired data, retrieval, training and evaluation for turning product shots of garments into
editorial photo-shoot images. Importing the top-level package is deliberately cheap: heavy
dependencies (diffusers, transformers, open_clip) load only inside the submodules that need them.
"""

from fashionshoot.errors import ConfigError, DataError, FashionshootError, MissingWeightsError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "FashionshootError", "MissingWeightsError", "__version__"]
