"""Launching jobs: command lines for torchrun and the deepspeed launcher, DeepSpeed hostfiles, Slurm hostlists and
sbatch scripts. Pure Python with no torch or deepspeed at import, so `vimoe launch` starts fast on a login node; the
ranks it starts resolve their own environment with `vimoe_dist.parallel.env.resolve_env`.
"""
