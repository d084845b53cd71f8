"""What a run leaves on disk: atomic file writes (``files.py``), heat-map overlays and the HTML report
(``report.py``), and the scores, maps, overlays and masks of a prediction run (``predictions.py``)."""
