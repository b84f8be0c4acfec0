"""rawwave: streaming, audio-first inference for encoder-free multimodal language models.

This shared package holds only what ingest, worker and export agree on: the CLI entry point,
the settings, logging, the stream contract and the model-directory contract.
"""

__version__ = "0.1.0"
