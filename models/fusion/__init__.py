"""Image-side fusion blocks of FISVL's FGIS module."""
from .graph_reasoning import GraphReasoning
from .sfgs import SFGS

__all__ = ["GraphReasoning", "SFGS"]
