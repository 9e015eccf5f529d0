"""Networks of J-RAS: segmentation backbones, the guided segmenter and the retriever."""

from jras_core.models.backbones import BACKBONES, build_backbone
from jras_core.models.jras import JRASModel, build_model
from jras_core.models.retriever import Retriever
from jras_core.models.segmenter import GuidedSegmenter

__all__ = ["BACKBONES", "GuidedSegmenter", "JRASModel", "Retriever", "build_backbone", "build_model"]
