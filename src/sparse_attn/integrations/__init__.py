"""Integrations with model libraries. ``hf``: Hugging Face transformers (needs ``transformers``)."""

from .hf import LayerRecord, Recorder, patch, record, unpatch

__all__ = ["LayerRecord", "Recorder", "patch", "record", "unpatch"]
