"""Training on Ray Train: AdaB and SSC objectives, checkpoints in object storage, resumable runs.

job.py         TrainJob: the job's fields, defaults and validation
run.py         ``run``: the TorchTrainer around the worker loop, the run's job.json
worker.py      the per-worker loop (model, DDP, AMP, accumulation, checkpoints, metrics)
feed.py        each worker's augmented batches, reproducible from (seed, epoch)
bad_pairs.py   pairs that cannot train: re-batching around them, per-epoch counts, BadPairsError
faults.py      FailureInjection: the test hook that kills a worker at a step or mid-checkpoint
state.py       checkpoint contents (optimiser, schedule, data position) and the metrics log
optim.py       trainable parameters, AdamW groups, poly schedule, gradient clipping
validation.py  periodic mIoU on held-out pairs
"""
