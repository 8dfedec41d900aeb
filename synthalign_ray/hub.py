"""The hub models a config names, checked before anything starts: each exists on the hub (`HF_ENDPOINT`,
else huggingface.co), at its revision where the reference pins one (`org/name@REVISION`), and a gated one
has a token with access. A typo in a hub id or a missing token otherwise shows only when a GPU actor first
loads the model, after the cluster has scaled up.

Where the hub cannot be reached, every hub reference is reported as not checked, never as fine. Under
`HF_HUB_OFFLINE` nothing is asked: the config's validation already required each one in the local cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from synthalign_ray.base import hub_offline, is_hub_id, split_revision

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HubCheck:
    field: str  # the config field naming the model, e.g. `images.model`
    ref: str
    problem: str | None  # what is wrong with it, None when it is there and can be loaded
    reached: bool = True  # False: the hub could not be asked, so nothing is known

    def line(self) -> str:
        return f"{self.field}: hub model {self.ref!r} {self.problem}"


def check_hub_models(refs: Mapping[str, str], *, environ: Mapping[str, str] = os.environ) -> list[HubCheck]:
    """One check per hub reference in `refs` (config field -> model reference); zoo models and local
    folders are not the hub's. The endpoint and token are `environ`'s HF_ENDPOINT and HF_TOKEN (else the
    token `huggingface-cli login` saved)."""
    hub_refs = {field: ref for field, ref in refs.items() if is_hub_id(ref)}
    if not hub_refs or hub_offline(environ):
        return []
    from huggingface_hub import HfApi, get_token

    endpoint = (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = environ.get("HF_TOKEN") or get_token()
    api = HfApi(endpoint=endpoint)
    by_ref: dict[str, tuple[str | None, bool]] = {}
    reachable = True
    for ref in dict.fromkeys(hub_refs.values()):  # each model once, however many fields name it
        by_ref[ref] = _check(api, endpoint, ref, token) if reachable else (f"not checked: {endpoint} could not be reached", False)
        reachable = by_ref[ref][1]  # unreachable once: not asked again
    return [HubCheck(field, ref, *by_ref[ref]) for field, ref in hub_refs.items()]


def _check(api, endpoint: str, ref: str, token: str | None) -> tuple[str | None, bool]:
    import httpx2  # huggingface_hub 2's HTTP client: its transport errors (refused, timed out, DNS)
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = split_revision(ref)
    page = f"{endpoint}/{repo_id}"
    try:
        info = api.model_info(repo_id, revision=revision, timeout=TIMEOUT_S, token=token or False)
        if info.gated and not token:
            return f"is gated: accept its conditions at {page}, then set HF_TOKEN (resources.secret_env: [HF_TOKEN] forwards it to the workers)", True
        if info.gated:
            api.auth_check(repo_id, token=token)
        return None, True
    except GatedRepoError:
        return f"is gated and HF_TOKEN's account has no access: accept its conditions at {page}", True
    except RepositoryNotFoundError:
        return f"does not exist on {endpoint} (or it is private and HF_TOKEN is not set or has no access)", True
    except RevisionNotFoundError:
        return f"has no revision {revision!r} on {endpoint} (branches, tags and commit shas are accepted)", True
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        return f"not checked: {endpoint} could not be reached ({type(error).__name__})", False
