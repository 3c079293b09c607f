"""NVIDIA DALI data path (--use_dali)."""
