"""clse_exp's submitit launchers: packed (several sweep points per job, one model load) and per-point ones;
both end a sweep with one clear error line per job that SLURM cancelled or killed."""
