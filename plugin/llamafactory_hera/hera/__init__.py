"""HeRA (head-wise representation alignment): ``stage: hera``, its arguments, trainer, teacher and head selection."""
