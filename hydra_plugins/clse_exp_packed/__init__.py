"""Packed submitit launchers: several sweep points per job, so a model is loaded once per job."""
