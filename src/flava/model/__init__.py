from .codebook import CodebookDecoder, FlavaImageCodebook
from .encoders import EncoderOutput, ImageEncoder, MultimodalEncoder, MultimodalLayout, MultimodalOutput, TextEncoder
from .flava import FlavaModel, FlavaOutput, TextTower
from .heads import ITMHead, MaskedPredictionHead

__all__ = [
    "CodebookDecoder", "EncoderOutput", "FlavaImageCodebook", "FlavaModel", "FlavaOutput", "ITMHead", "ImageEncoder",
    "MaskedPredictionHead", "MultimodalEncoder", "MultimodalLayout", "MultimodalOutput", "TextEncoder", "TextTower",
]
