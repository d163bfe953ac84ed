"""Streamlit pieces the pages share (session state, the job panel, tables, the 3D viewer, charts).
The top layer: it imports the product layer, nothing below imports it."""
