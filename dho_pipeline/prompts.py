"""Class-name and prompt-template files: plain UTF-8 text, one entry per line.

Blank lines and lines starting with `#` are ignored; a line ends at LF, CRLF or CR, and an entry
holding a control character (a form feed, NEL, ...) is refused. A template holds exactly one `{}`,
where the class name goes (`a photo of the large {}.`). A templates argument may also name a set that
ships with the package (manifests/templates/: `imagenet`, `oxford_pets`, `eurosat`, ...). Class names
may repeat (CLIP's ImageNet names do: "sunglasses").
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from .errors import UserError

# Guard against pointing a flag at the wrong file (an image, a tar shard).
_MAX_BYTES = 16 << 20


def read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise UserError(f"{what} file {path} is larger than {_MAX_BYTES >> 20} MB; is it the right file?")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} file {path} is a directory") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{what} file {path} cannot be read ({error.strerror})") from None
    # Not str.splitlines(): it also breaks at a form feed, NEL or U+001C-U+001E, which would silently
    # make two entries of one line (and shift every label after it).
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    entries = [line for line in lines if line and not line.startswith("#")]
    for number, line in enumerate(entries, start=1):
        if any(unicodedata.category(ch) == "Cc" for ch in line):  # C0, DEL and C1 controls
            raise UserError(f"{what} file {path}: entry {number} contains a control character")
    if not entries:
        raise UserError(f"{what} file {path} has no entries (one per line expected)")
    return entries


def read_classnames(path: str | Path) -> list[str]:
    return read_lines(path, "class-names")


def templates_file(path: str | Path) -> Path:
    """A templates file, or the name of one that ships with the package (`oxford_pets`, `imagenet`, ...)."""
    from .package_data import TEMPLATES, shipped_file, shipped_names

    path = Path(path)
    if path.exists():
        return path
    shipped = shipped_file(TEMPLATES, str(path))
    if shipped is None and path.parent == Path(".") and not path.suffix:
        raise UserError(f"templates {path} is neither a file nor a set that ships with dho-pipeline "
                        f"({', '.join(shipped_names(TEMPLATES))})")
    return shipped or path


def read_templates(path: str | Path) -> list[str]:
    path = templates_file(path)
    templates = read_lines(path, "templates")
    for number, template in enumerate(templates, start=1):
        if template.count("{}") != 1:
            raise UserError(
                f"templates file {path}: entry {number} ({template!r}) must contain exactly one '{{}}' "
                "where the class name goes"
            )
    return templates


def fill_template(template: str, classname: str) -> str:
    """`str.format` would choke on other braces in a template; replace the one slot instead."""
    return template.replace("{}", classname)
