"""Reading labelling outputs (their layout: ``pipeline.layout``): SQL queries, overlays, exports.

query.py    DuckDB views (``images``, ``segments``) over the committed shards
overlay.py  one image drawn with its masks and legend
export.py   COCO JSON and PNG label-map exports
"""
