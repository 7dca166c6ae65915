"""`vimoe doctor`: the node check to run before a job, so that a broken node says so before 64 GPUs wait on it.

Software (Python, torch, CUDA, NCCL, DeepSpeed and whether its ops load), hardware (GPUs with their memory and bf16
support, InfiniBand ports), the node's limits (/dev/shm, open files, free disk in `run.out_dir`, the metrics ports
of the local ranks) and, with `--config`, the run's inputs (the first shard decodes, the pretrained file loads, the
model builds and what it costs in FLOPs). Every check answers ok / warn / fail with a one-line fix and is bounded in
time: anything that can hang (importing torch or DeepSpeed, CUDA, a JIT-built op, a remote shard) runs in a thread
or a subprocess with a timeout. `--gpu-bench` adds measurements on the GPUs (`gpu_bench.py`).

Modules: `result` (the check record, time bounds), `probe` (what a fresh interpreter sees of torch and DeepSpeed),
`software`, `node`, `inputs` (the checks), `run` (order, output, JSON), `gpu_bench` and `gpu_worker` (the bench),
`cli`.
"""
