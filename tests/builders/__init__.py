"""Builders of small test models in the real on-disk layouts (never meaningful outputs)."""
