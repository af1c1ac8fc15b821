"""Everything that runs on Ray, in rooms by job: ``label/``, ``train/``, ``evaluate/``, ``results/``.

Shared by the rooms: ``layout`` (a labelling output's files and schema), ``pairs`` (image/label pair sets),
``jobmodel`` (what job definitions share), ``storage`` (fsspec I/O), ``cluster`` (which Ray a job joins),
``batches``. Imports ``ebseg`` (the model library) and never ``jobs`` (the CLI and specs).
"""
