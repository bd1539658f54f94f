"""The maths of attention heads every method uses: geometry and L<layer>H<head> references, head-input pooling,
per-head projection (head maths one method alone uses lives in that method's package)."""
