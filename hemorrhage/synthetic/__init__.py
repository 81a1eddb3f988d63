"""Synthetic RSNA DICOM studies built on the real brain atlas (scripts/hemorrhage_make_synthetic.py)."""
