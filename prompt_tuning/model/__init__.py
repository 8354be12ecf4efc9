"""The frozen model: T5-family config, the Flax T5 with its optional prompt layer, attention
masks, the scanned-layer layout and how arrays are placed on a mesh (logical-axis rules)."""
