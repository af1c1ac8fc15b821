"""Everything that runs on Ray: labelling dataflow, training loop, storage I/O, query.

Imports ``ebseg`` (the model library) and never ``jobs`` (the CLI and specs).
"""
