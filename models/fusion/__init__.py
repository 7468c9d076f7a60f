"""Image- and text-side fusion blocks: FISVL's FGIS (graph reasoning, SFGS) and PIR's PAE blocks."""
from .graph_reasoning import GraphReasoning
from .pae import MHSA, CroSA, MHAtt
from .sfgs import SFGS

__all__ = ["CroSA", "GraphReasoning", "MHAtt", "MHSA", "SFGS"]
