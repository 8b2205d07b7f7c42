"""Files that ship inside the package: ImageNet's class names, prompt templates, class subsets, the run recipes.

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
IMAGENET_WNIDS = packaged_file("imagenet_wnids.txt")  # class folders in label order (for `shard --classes`)
RECIPES = packaged_file("recipes")
TEMPLATES = packaged_file("templates")  # <data set>.txt: the templates CoOp / DHO use for each data set
IMAGENET_TEMPLATES = TEMPLATES / "imagenet.txt"  # the paper's 7
SUBSETS = packaged_file("subsets")  # imagenet-a.txt, imagenet-r.txt: WordNet ids of ImageNet's class subsets


def shipped_names(folder: Path) -> list[str]:
    """Names of the files that ship in one of the folders above (file stems)."""
    return sorted(path.stem for path in folder.glob("*.txt"))


def shipped_file(folder: Path, name: str) -> Path | None:
    """The shipped file a name means (`oxford_pets`, `oxford-pets`, `imagenet-a`), or None."""
    for candidate in dict.fromkeys((name, name.replace("-", "_"), name.replace("_", "-"))):
        path = folder / f"{candidate}.txt"
        if "/" not in candidate and path.is_file():
            return path
    return None
