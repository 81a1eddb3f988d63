"""Chest CT data: CT-RATE files and tables, preprocessing, the HDF5 store, synthetic volumes."""
