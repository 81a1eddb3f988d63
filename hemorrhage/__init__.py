"""First-place RSNA 2019 intracranial hemorrhage solution, rebuilt."""
