"""Checkpoint and file I/O: reading and writing safetensors checkpoints, untrusted text files, output directories, LLaVA format conversion, model cards."""
