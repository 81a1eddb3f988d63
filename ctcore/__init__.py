"""Shared ground for both packages: real sample data and command-line config handling.

`ctclip` and `hemorrhage` never import each other; both may import `ctcore`, which imports neither.
"""
