"""Attention-head maths every method uses."""
