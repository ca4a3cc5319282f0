"""Interoperability with other ecosystems (Hugging Face transformers and tokenizers)."""
