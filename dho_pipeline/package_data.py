"""Files that ship inside the package: ImageNet's class names, the paper's prompt templates, the run recipes.

In the repository they live in the top-level `manifests/` folder, which pyproject.toml installs as the
package `dho_pipeline.manifests`; they are found through importlib.resources, so an installed copy
finds them wherever it runs, not only next to a source tree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def packaged_file(*parts: str) -> Path:
    """Path of a file under `manifests/` (installed as dho_pipeline.manifests)."""
    found = files("dho_pipeline.manifests")
    for part in parts:
        found = found / part
    return Path(str(found))


IMAGENET_CLASSNAMES = packaged_file("imagenet_classnames.txt")
IMAGENET_TEMPLATES = packaged_file("imagenet_templates.txt")
IMAGENET_WNIDS = packaged_file("imagenet_wnids.txt")  # class folders in label order (for `shard --classes`)
RECIPES = packaged_file("recipes")
