"""Head selection: score every head by MKNN against the teacher and pick the heads to align."""
