"""What a server owner may set, in one place: where models and fine-tuning data may be read
from, and the limits of one request.

Each setting comes from an environment variable, else from the `[crystallm]` table of
`.streamlit/secrets.toml` (the repository's, or $CRYSTALLM_SECRETS), else its default:

| setting | variable | secrets key | default |
|---|---|---|---|
| model roots | CRYSTALLM_MODEL_ROOTS | model_roots | the shipped model, `models/` |
| data roots | CRYSTALLM_DATA_ROOTS | data_roots | `data/user/` |
| fine-tuned models go to | CRYSTALLM_FINETUNE_DIR | finetune_dir | `models/` |
| structures per request | CRYSTALLM_MAX_STRUCTURES | max_structures | 256 |
| jobs queued or running | CRYSTALLM_MAX_JOBS | max_jobs | 8 |
| upload size (MB) | CRYSTALLM_MAX_UPLOAD_MB | max_upload_mb | 50 |

Root lists in a variable are separated by the path separator (":" on Linux). The fine-tune
folder is always a model root, so what the server trains it can load. A path the user gives is
resolved (symlinks followed, ".." collapsed) before it is compared with the roots.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from crystallm_core.lm.checkpoints import HUB_ID_PATTERN
from crystallm_core.paths import DEFAULT_MODEL_DIR, REPO_DIR

SECRETS_FILE = REPO_DIR / ".streamlit" / "secrets.toml"
SECTION = "crystallm"
DEFAULT_MAX_STRUCTURES = 256


@dataclass(frozen=True)
class ServerSettings:
    model_roots: tuple[Path, ...]
    data_roots: tuple[Path, ...]
    finetune_dir: Path
    max_structures: int
    max_jobs: int
    max_upload_mb: int


def secrets_table() -> dict:
    """The `[crystallm]` table of the secrets file ({} when there is none)."""
    path = Path(os.environ.get("CRYSTALLM_SECRETS", SECRETS_FILE))
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text()).get(SECTION, {})
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read server settings from {path}: {error}") from None
    return table if isinstance(table, dict) else {}


def setting(name: str, variable: str, table: dict, default):
    """The variable's text, else the secrets value, else the default."""
    if os.environ.get(variable):
        return os.environ[variable]
    return table.get(name, default)


def as_paths(value) -> tuple[Path, ...]:
    items = value.split(os.pathsep) if isinstance(value, str) else list(value)
    return tuple(Path(item).expanduser().resolve() for item in items if str(item).strip())


def as_positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"server setting {name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"server setting {name} must be at least 1, got {number}")
    return number


def server_settings() -> ServerSettings:
    """The settings now (read on every call: cheap, and tests change the environment)."""
    table = secrets_table()
    finetune_dir = as_paths([setting("finetune_dir", "CRYSTALLM_FINETUNE_DIR", table, REPO_DIR / "models")])[0]
    model_roots = as_paths(setting("model_roots", "CRYSTALLM_MODEL_ROOTS", table,
                                   [DEFAULT_MODEL_DIR, REPO_DIR / "models"]))
    return ServerSettings(
        model_roots=tuple(dict.fromkeys((*model_roots, finetune_dir))),
        data_roots=as_paths(setting("data_roots", "CRYSTALLM_DATA_ROOTS", table, [REPO_DIR / "data" / "user"])),
        finetune_dir=finetune_dir,
        max_structures=as_positive_int(setting("max_structures", "CRYSTALLM_MAX_STRUCTURES", table, DEFAULT_MAX_STRUCTURES),
                                       "max_structures"),
        max_jobs=as_positive_int(setting("max_jobs", "CRYSTALLM_MAX_JOBS", table, 8), "max_jobs"),
        max_upload_mb=as_positive_int(setting("max_upload_mb", "CRYSTALLM_MAX_UPLOAD_MB", table, 50),
                                      "max_upload_mb"),
    )


def within_roots(path: str | Path, roots: tuple[Path, ...], what: str) -> Path:
    """`path` resolved (symlinks, "..") if it lies inside one of `roots`; else a ValueError that
    says where `what` may come from. Existence is not checked here, so nothing is revealed
    about paths outside the roots."""
    text = str(path).strip()
    if not text:
        raise ValueError(f"no path given for {what}")
    resolved = Path(text).expanduser().resolve()
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return resolved
    allowed = ", ".join(str(root) for root in roots) or "none configured"
    raise ValueError(f"{text} is outside the folders this server reads {what} from ({allowed})")


def check_upload_size(size: int, settings: ServerSettings | None = None) -> None:
    """ValueError when an upload is over the server's limit."""
    limit = (settings or server_settings()).max_upload_mb
    if size > limit * 2**20:
        raise ValueError(f"the file is {size / 2**20:.1f} MB; this server accepts uploads up to {limit} MB")


def allowed_model_source(text: str, hub: bool = False) -> str:
    """What the Home page may load: a directory inside the model roots (resolved), or with
    `hub` a Hugging Face id (config + safetensors only). ValueError otherwise."""
    text = text.strip()
    if hub and HUB_ID_PATTERN.match(text) and not text.startswith((".", "/", "~")) and not Path(text).exists():
        return text
    if hub:
        raise ValueError(f"'{text}' is not a hub id of the form owner/model-name")
    return str(within_roots(text, server_settings().model_roots, "models"))
