"""open_clip, imported without its optional Hugging Face text towers.

When `transformers` is installed (the `hf`/`llm`/`dev` extras), `import open_clip` also imports it
for HF text towers that ctclip never uses, which adds ~2 s to every process that builds a model (DDP
ranks, DataLoader workers started with spawn, each script). Importing open_clip through this module
makes its optional `import transformers` fail fast instead; open_clip then simply disables HF
towers. Nothing else changes: `transformers` itself stays importable afterwards.
"""

from __future__ import annotations

import sys


def _import_open_clip():
    if "transformers" in sys.modules:  # already paid for (e.g. the impressions script)
        import open_clip
        return open_clip
    sys.modules["transformers"] = None  # type: ignore[assignment]  # makes `import transformers` raise
    try:
        import open_clip
    finally:
        del sys.modules["transformers"]
    return open_clip


open_clip = _import_open_clip()
