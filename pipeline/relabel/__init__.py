"""Relabelling: a labelling output's stored proposals + another vocabulary -> a new labelling output."""
