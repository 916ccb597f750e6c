"""Training the photoshoot generator (garment adapter + pose channels, optionally the UNet).

``run(PhotoshootTrainConfig)`` is the whole job; ``train/photoshoot.py`` is its command line.
"""

from fashionshoot.training.config import PhotoshootTrainConfig
from fashionshoot.training.loop import TrainingDiverged, run

__all__ = ["PhotoshootTrainConfig", "TrainingDiverged", "run"]
