"""Camera producers: sources (synthetic, folder, video, usb) -> preprocess -> object store + FrameRefs."""

from producers.base import Frame, FrameSource, InvalidSourceError, ProducerError, SourceUnavailable
from producers.publisher import ProducerStats
from producers.run import build_sources, run_producer
from producers.synthetic import generate_dataset, render_part

__all__ = [
    "Frame", "FrameSource", "InvalidSourceError", "ProducerError", "ProducerStats", "SourceUnavailable",
    "build_sources", "generate_dataset", "render_part", "run_producer",
]
