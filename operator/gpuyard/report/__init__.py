"""Charts and report pages drawn with matplotlib: the optional `report` extra
(`pip install 'gpuyard[report]'`), never installed in the operator image.

The pure core builds the data (`gpuyard.logic.usage_report`); this package only draws it.
Figures are `matplotlib.figure.Figure` objects on the non-interactive Agg canvas, never
pyplot's global figure manager, so that drawing is safe in any process and a test can
inspect what was drawn; `figures` turns one figure into PNG bytes, SVG text or inline SVG.
"""
