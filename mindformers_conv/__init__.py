"""mindformers-conv: bidirectional, streaming weight converter for MindSpore Transformers."""

__version__ = "0.1.0"
