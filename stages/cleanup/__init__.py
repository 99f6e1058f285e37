"""Cleanup stages: ``cleanup.text``, ``cleanup.image``, ``cleanup.audio``.

Each turns one crawled value into trainable, normalised media (or a ``Reject`` with a stable
reason code; see docs/reject_reasons_cleanup.md). Importing a submodule registers its stage.
"""
