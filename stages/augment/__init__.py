"""Augmentation: ``augment.copies`` adds k seeded copies of each training row, then
``augment.{image,text,audio}`` apply a recorded random policy to those copies.

Every drawn parameter is written to the row's ``aug_params`` JSON, so
``replay(modality, original, ops)`` reproduces an augmented value byte for byte.
"""
from stages.augment.base import ModalityAugmenter, Op, OpPolicy, copy_seed, replay

__all__ = ["ModalityAugmenter", "Op", "OpPolicy", "copy_seed", "replay"]
