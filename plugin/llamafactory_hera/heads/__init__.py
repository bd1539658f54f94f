"""Attention-head maths every method uses: geometry, L<layer>H<head> references, head-input pooling, per-head
projection (one method's own head maths lives in its package)."""
