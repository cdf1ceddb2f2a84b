"""Training: the task-sequence driver, the per-worker loop, end-of-task work, modelling."""
