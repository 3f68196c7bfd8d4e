from .encoders import EncoderOutput, ImageEncoder, MultimodalEncoder, MultimodalLayout, MultimodalOutput, TextEncoder
from .flava import FlavaModel, FlavaOutput
from .heads import ITMHead, MaskedPredictionHead, PretrainingHeads

__all__ = [
    "EncoderOutput", "FlavaModel", "FlavaOutput", "ITMHead", "ImageEncoder", "MaskedPredictionHead",
    "MultimodalEncoder", "MultimodalLayout", "MultimodalOutput", "PretrainingHeads", "TextEncoder",
]
