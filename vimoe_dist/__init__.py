"""vimoe-dist: distributed expert-parallel training of Vision Mixture-of-Experts."""

__version__ = "0.1.0"
