"""Synthetic CT-RATE sets built on the real chest CT (scripts/ctclip_make_synthetic.py)."""
