"""Networks of every tier, created by name."""
from train.models.backbones import create_backbone

__all__ = ["create_backbone"]
