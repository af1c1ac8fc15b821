"""Labelling: images at any URI -> the ``images`` table of masks and labels, exactly once, resumably.

job.py        LabelJob: the job's fields, defaults and validation
plan.py       what a job resolves to (vocabulary, model, run id) and the claim on its output
listing.py    input URIs -> shards (files, tar, Parquet)      reading.py   a shard -> raw image rows
decode.py     bytes -> RGB arrays at the model's scale         segment.py   the model stage (actors)
records.py    predictions -> ``images`` records               commit.py    records -> committed shards
progress.py   the progress line                               run.py       the Ray Data graph; ``run``
diehook.py    a test hook: ``EBSEG_TEST_DIE_AT`` kills the process at a step of the commit
"""
