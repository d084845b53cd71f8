"""What a run leaves on disk: an output folder owned through its manifest (``folders.py``), heat-map overlays
and the HTML report (``report.py``), and the scores, maps, overlays and masks of a prediction run
(``predictions.py``). Every file is written atomically (:mod:`clipfusion.files`)."""
