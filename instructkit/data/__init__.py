"""Instruction data: reading files, detecting formats, validating records, chat templates and
loss masks, collation and packing. Importing this package does not import torch."""
