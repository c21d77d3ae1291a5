"""Hugging Face Hub models for `hf:org/name[@revision]` specs, read through the Hub's own client
(huggingface_hub) and cache.

A Hub id resolves to a snapshot folder of the Hub cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), the layout `hf download` and transformers write:
models--org--name/{refs/REVISION, snapshots/COMMIT/...}. The cache comes first: a revision the
cache holds whole (config.json and its safetensors) is read from it without asking the Hub, so
validation, resumes and offline machines (HF_HUB_OFFLINE=1) need no network, and a cached
`main` stays what it was until `hf download` fetches a newer one. Only what is missing is
downloaded, and only the files jtrain reads (FILES), with the Hub's progress bars. Each repo
and revision is resolved once per process, failures included.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jtrain.errors import UserError

# Files jtrain reads from a model repo: architecture, weights, tokenizer and chat template, and
# what `jtrain.export` copies beside them. Subfolders (original/, onnx/) are never fetched.
FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "vocab.json", "merges.txt",
)  # fmt: skip
_PATTERNS = {"allow_patterns": list(FILES), "ignore_patterns": ["*/*"]}
# org/name (the Hub's characters), then an optional @revision: a branch, tag or commit.
_REPO_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>\S+))?", re.ASCII
)
_TRUE = ("1", "ON", "YES", "TRUE")


class HubError(UserError, ValueError):
    """A Hub model that cannot be had; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A revision of a Hub model in the local cache: the commit it names and its folder."""

    repo_id: str
    revision: str
    commit: str
    path: str


def parse(text: str) -> tuple[str, str] | None:
    """(repo id, revision) of `org/name[@revision]` (revision "main" when not given), else None."""
    match = _REPO_ID.fullmatch(text)
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"] or "main"


def cache_dir() -> str:
    """The Hub cache, from the environment as it is now (huggingface_hub reads it at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids asking the Hub."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.upper() in _TRUE


_RESOLVED: dict[tuple[str, str, str, bool], Snapshot | HubError] = {}


def snapshot(repo_id: str, revision: str = "main") -> Snapshot:
    """The cached snapshot of `repo_id` at `revision`, downloading what it lacks unless offline;
    a HubError says what to do when it cannot be had."""
    key = (repo_id, revision, cache_dir(), offline())
    if key not in _RESOLVED:
        try:
            _RESOLVED[key] = _resolve(*key)
        except HubError as err:
            _RESOLVED[key] = err
    found = _RESOLVED[key]
    if isinstance(found, HubError):
        raise found
    return found


def _resolve(repo_id: str, revision: str, cache: str, is_offline: bool) -> Snapshot:
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    spec = _spec(repo_id, revision)
    where = f"is not a local directory nor in the Hugging Face cache at {cache}"
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True, **_PATTERNS
        )
        lacks = _lacks(path)
        if lacks is None:
            return Snapshot(repo_id, revision, os.path.basename(path), path)
        where = (
            f"is not a local directory, its snapshot in the Hugging Face cache at {cache} {lacks}"
        )
    except LocalEntryNotFoundError:  # not cached, or cached in part (newer huggingface_hub)
        pass
    if is_offline:
        reason = "the Hub cannot be reached (offline: HF_HUB_OFFLINE is set)"
        raise HubError(_unavailable(spec, where, reason))
    print(f"jtrain: fetching {spec} from the Hugging Face Hub into {cache}", flush=True)
    path = _download(repo_id, revision, cache, where)
    lacks = _lacks(path)
    if lacks:
        raise HubError(
            f"hf:{spec} cannot be used: its snapshot {lacks} (jtrain reads config.json and "
            "safetensors weights; a model with only PyTorch .bin weights needs converting)"
        )
    return Snapshot(repo_id, revision, os.path.basename(path), path)


def _download(repo_id: str, revision: str, cache: str, where: str) -> str:
    """Fetches what the cache lacks of the revision; HubError for what the Hub refuses."""
    import huggingface_hub
    from huggingface_hub import utils

    spec = _spec(repo_id, revision)
    login = f"log in with `{_cli('login')}` or set HF_TOKEN"
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, **_PATTERNS
        )
    except utils.GatedRepoError:
        page = f"https://huggingface.co/{repo_id}"
        raise HubError(f"hf:{spec} is gated: accept its terms at {page}, then {login}") from None
    except utils.RepositoryNotFoundError:
        raise HubError(
            f"hf:{spec}: the Hugging Face Hub has no model {repo_id}, or it is private ({login}); "
            "a local directory is hf:/path/to/dir"
        ) from None
    except utils.RevisionNotFoundError:
        raise HubError(
            f"hf:{spec}: {repo_id} has no revision {revision!r} (a branch, tag or commit)"
        ) from None
    except utils.LocalEntryNotFoundError as err:  # the Hub unreachable, nothing cached
        reason = f"the Hub cannot be reached ({_first_line(err.__cause__ or err)})"
        raise HubError(_unavailable(spec, where, reason)) from None
    except utils.HfHubHTTPError as err:
        raise HubError(f"hf:{spec}: the Hugging Face Hub refused it: {_first_line(err)}") from None


def _lacks(path: str) -> str | None:
    """What a snapshot folder lacks of a model jtrain can load ("has no config.json"), or None."""
    from jtrain.interop import safetensors_io

    if not os.path.isfile(os.path.join(path, "config.json")):
        return "has no config.json"
    try:
        safetensors_io.weight_files(path)
    except ValueError:  # a DataError: no safetensors, or an index naming missing shards
        return "lacks safetensors weights"
    return None


def _unavailable(spec: str, where: str, reason: str) -> str:
    repo_id, _, revision = spec.partition("@")
    download = f"{_cli('download')} {repo_id}" + (f" --revision {revision}" if revision else "")
    return (
        f"hf:{spec} {where}, and {reason}: run `{download}` where "
        "there is network, or point HF_HUB_CACHE at a cache that has it; a local directory is "
        "hf:/path/to/dir"
    )


def _spec(repo_id: str, revision: str) -> str:
    return repo_id if revision == "main" else f"{repo_id}@{revision}"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0]


def _cli(action: str) -> str:
    """The installed huggingface_hub's command for `action` ("download" or "login"): `hf`
    since 0.34, `huggingface-cli` before (removed in 1.0)."""
    import huggingface_hub

    major, minor = (int(p) for p in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    if (major, minor) >= (0, 34):
        return {"download": "hf download", "login": "hf auth login"}[action]
    return f"huggingface-cli {action}"
