"""Image- and text-side fusion blocks: FISVL's FGIS (graph reasoning, SFGS), PIR's PAE blocks, AMFMN's MVSA
and visual-guided text attention."""
from .graph_reasoning import GraphReasoning
from .guided_text import GUIDED_ATTENTIONS, VisualGuidedText
from .mvsa import MVSA
from .pae import MHSA, CroSA, MHAtt
from .sfgs import SFGS

__all__ = ["CroSA", "GUIDED_ATTENTIONS", "GraphReasoning", "MHAtt", "MHSA", "MVSA", "SFGS", "VisualGuidedText"]
