"""Ray Tune search over loss weights: spaces, trials, schedulers and results."""
