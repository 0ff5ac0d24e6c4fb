"""Megatron parallel layout: TP/PP/VPP/EP placement of full tensors into rank files, and its inverse.

Pure math and declarations here; the on-disk format is `formats/megatron.py`.
"""
