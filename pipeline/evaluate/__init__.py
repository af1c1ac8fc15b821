"""Evaluation at scale: mIoU of a model over an (image, label map) pair set, on Ray Data.

job.py   EvalJob: the job's fields, defaults and validation
run.py   the Ray Data graph (decode, score on an actor pool) and ``run``, which writes metrics.json
"""
