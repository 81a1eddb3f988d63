"""Shared ground for both packages: real sample data and command-line config handling.

`ctclip` and `hemorrhage` never import each other; both may import `ctcore`, which imports neither.
"""


def toolkit_version() -> str:
    """The installed ct-toolkit version, or "unknown (not installed)" when the code runs from a source tree on
    PYTHONPATH without an install (a cluster node or a GPU box with its own Python)."""
    from importlib import metadata

    try:
        return metadata.version("ct-toolkit")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
