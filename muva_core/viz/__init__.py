"""Figures (paper Figures 4-7 style) and the part-mask explorer widget."""
