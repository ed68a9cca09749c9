"""Figures: matplotlib (static PNG/SVG) and plotly (interactive HTML) renderings of analyzer results."""
