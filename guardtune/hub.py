"""Push a release where models live: a Hugging Face Hub model repository, through `huggingface_hub`.

Only a release that `verify` accepts (every file matches manifest.json, the signature too when a key is set) and
that the gate released is pushed: a quarantined adapter or a tampered directory never leaves the machine. The
whole release directory goes up as it is (adapter/, README.md model card, manifest.json, report, gate decision),
so whoever downloads it can run `guardtune verify` on their copy. Credentials are huggingface_hub's own
(`HF_TOKEN`, or `huggingface-cli login`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, VerificationError
from .release import load_release, verify


@dataclass
class PushResult:
    repo_id: str
    url: str  # the commit (or repository) URL the hub returned
    release_id: str
    files: int

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "url": self.url, "release_id": self.release_id, "files": self.files}


def push(release_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
         api: Any = None) -> PushResult:
    """Upload a verified, released release directory to the model repository `repo_id` (created if missing)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--repo {repo_id!r} is not a hub repository id; use ORG/NAME (e.g. acme/support-bot-lora).")
    release = load_release(release_dir)
    checked = verify(release.path)
    if not checked.ok:
        found = [f"{len(names)} {what}: {', '.join(names[:3])}" for what, names in (
            ("changed", checked.mismatched), ("missing", checked.missing), ("unlisted", checked.unexpected),
            ("problems", checked.problems)) if names]
        raise VerificationError(f"{release.path} does not match its manifest ({'; '.join(found)}); it is not "
                                f"pushed. Re-publish it from its run directory.")
    if not release.released:
        raise VerificationError(f"{release.path} was quarantined by the gate (failed: "
                                f"{', '.join(sorted({r['rule'] for r in release.failed_rules}))}); only released "
                                f"adapters are pushed.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(release.path), repo_id=repo_id, repo_type="model",
                               commit_message=f"guardtune release {release.id} (gate: pass)")
    url = getattr(commit, "commit_url", None) or str(commit)
    return PushResult(repo_id=repo_id, url=url, release_id=release.id, files=len(release.files))
