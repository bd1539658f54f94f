"""What the offline tools (selection, calibration, evaluation) load through LLaMA-Factory: model, data, engine."""
