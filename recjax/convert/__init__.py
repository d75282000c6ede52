"""Checkpoint conversion: Hugging Face T5 / FLAN-T5 <-> recjax parameters."""

from recjax.convert.t5_hf import load_t5_from_hf, save_t5_to_hf

__all__ = ["load_t5_from_hf", "save_t5_to_hf"]
