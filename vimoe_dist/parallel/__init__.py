"""The one home of torch.distributed and DeepSpeed: everything that knows there is more than one rank.

    env.py               where this process sits in the job (launcher variables, Slurm, or a single process)
    init.py              the process group: backend, timeouts, DeepSpeed's initialisation
    groups.py            the expert-parallel groups (DeepSpeed's registry, its private functions used only here)
    parallelize.py       expert parallelism in one step: shard experts, all-to-all dispatch, DeepSpeed's adapter
    alltoall.py          the dispatcher that moves token rows to their experts' ranks and back
    adapter.py           our MoE FFN presented to DeepSpeed as a `deepspeed.moe.layer.MoE`
    engine.py            optimizer groups for expert parameters, `deepspeed.initialize`, `unwrap`
    ds_config.py         the DeepSpeed config, derived from ours
    checkpoint_layout.py every checkpoint file name and key pattern, and reading a checkpoint back
    layout.py            the layout of a run and of a checkpoint (ranks, ep_size, ZeRO, precision, experts, router)
    checkpoint_fit.py    whether a checkpoint fits this run: one line naming the file and the mismatch
    optim_state.py       a checkpoint's optimizer state per parameter, whole, from DeepSpeed's per-rank files
    optim_load.py        ... loaded into a run at another layout (what makes the optimizer state reshard)
    checkpoint_plan.py   a checkpoint's tags and the files each rank reads to resume it at a layout
    cli.py               `vimoe checkpoint info|reshard`
    collectives.py       the few collectives the trainer, evaluation and analysis use
    peers.py             which rank broke the job, after a collective failed
    reference/           DeepSpeed's and fairscale's MoE layers behind our interface, for comparisons

Submodules are imported where needed: `vimoe_dist.parallel.env` stays cheap (no torch, no DeepSpeed).
"""
