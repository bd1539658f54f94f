"""Figures: a run's training curves, head heatmaps and tables, and the text and saving they share."""
