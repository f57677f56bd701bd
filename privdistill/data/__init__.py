"""Data sources, preprocessing and the ImageSet container."""

from privdistill.data.types import ImageSet

__all__ = ["ImageSet"]
