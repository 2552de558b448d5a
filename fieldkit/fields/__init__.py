"""Neural-field building blocks: hash-grid encoding, CAM modulation, occupancy grid."""

from fieldkit.fields.hashgrid import HashGrid, HashGridConfig, hash_encode_torch, level_layout, per_level_scale_for

__all__ = ["HashGrid", "HashGridConfig", "hash_encode_torch", "level_layout", "per_level_scale_for"]
