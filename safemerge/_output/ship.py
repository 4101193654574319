"""What travels with the merged weights so that the directory can be served and shared as it is: the tokenizer or
processor (with its chat template) and a model card."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemerge._model.inputs import load_failures_as_input_errors
from safemerge._records import Action, MergePlan, MergeReport, Verification

logger = logging.getLogger(__name__)

#: Files whose presence says a directory holds a tokenizer or a processor.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Extras:
    """What is saved beside the merged weights, and the names the model card gives."""

    tokenizer: Any = None
    tokenizer_source: str | None = None
    base: str | None = None
    adapter: str | None = None


def write_extras(
    directory: Path,
    extras: Extras,
    plan: MergePlan,
    actions: list[Action],
    verification: Verification | None,
    serving: tuple[str, ...] = (),
) -> list[Action]:
    """Save the tokenizer (if any) and the model card into `directory`; the actions taken."""
    done = []
    source, _ = card_name(extras.tokenizer_source)  # the card lists the actions: no local path in them
    if extras.tokenizer is not None:
        done.append(save_tokenizer(extras.tokenizer, directory, source))
    described = f"from {source}" if extras.tokenizer is not None and source else "saved"
    tokenizer = described if extras.tokenizer is not None else "none was found or given; add one before serving"
    card = write_card(
        directory,
        base=extras.base,
        adapter=extras.adapter,
        plan=plan,
        actions=[*actions, *done],
        verification=verification,
        tokenizer=tokenizer,
        serving=serving,
    )
    return [*done, card]


def find_tokenizer(candidates: list[tuple[str, dict[str, Any]]]) -> tuple[Any, str | None]:
    """The first tokenizer of `candidates` ((directory or hub id, from_pretrained options), the adapter first: the
    fine-tune's chat template is the one that counts) and where it came from; (None, None) if none has one.

    A local directory counts when it holds tokenizer files, and then they must load (InputError otherwise); a hub
    repository counts when its tokenizer loads (an adapter repository often has none).
    """
    for source, options in candidates:
        path = Path(source)
        if path.is_dir():
            if not any((path / name).exists() for name in (*_TOKENIZER_FILES, *_PROCESSOR_FILES)):
                continue
            with load_failures_as_input_errors(
                f"Could not load the tokenizer saved in '{source}'",
                "Nothing was merged. Fix: save a complete tokenizer there (tokenizer.save_pretrained), or remove "
                "its files.",
            ):
                return load_tokenizer(source, **options), source
        try:
            return load_tokenizer(source, **options), source
        except (OSError, ValueError):  # no tokenizer in that repository
            continue
    return None, None


def load_tokenizer(source: str, **options: Any) -> Any:
    """The processor (multimodal) or the tokenizer saved in `source`, with transformers' Auto classes; `options`
    (revision, token, trust_remote_code) go to from_pretrained."""
    import transformers

    local = Path(source)
    if local.is_dir() and any((local / name).exists() for name in _PROCESSOR_FILES):
        return transformers.AutoProcessor.from_pretrained(source, **options)  # type: ignore[no-untyped-call]
    return transformers.AutoTokenizer.from_pretrained(source, **options)


def save_tokenizer(tokenizer: Any, directory: Path, source: str | None) -> Action:
    """Save the tokenizer (its chat template included) beside the merged weights."""
    tokenizer.save_pretrained(str(directory))
    where = f" from {source}" if source else ""
    template = " and its chat template" if getattr(tokenizer, "chat_template", None) else ""
    return Action("save-tokenizer", (), f"saved the {type(tokenizer).__name__}{template}{where}")


def write_card(
    directory: Path,
    *,
    base: str | None,
    adapter: str | None,
    plan: MergePlan,
    actions: list[Action],
    verification: Verification | None,
    tokenizer: str,
    serving: tuple[str, ...] = (),
) -> Action:
    """README.md with hub metadata (base_model, library_name, tags) and what safemerge did and checked."""
    from huggingface_hub import ModelCard, ModelCardData

    from safemerge._version import __version__

    base_name, hub_base = card_name(base, config_file="config.json")
    adapter_name, _ = card_name(adapter)
    data = ModelCardData(base_model=hub_base, library_name="transformers", tags=["safemerge", "peft", "merge"])
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {adapter_name or 'Adapter'} merged into {base_name or 'its base model'}",
        "",
        f"Merged with safemerge {__version__} under the tie policy `{plan.policy}`: {plan.reason}.",
        "",
        f"Tokenizer: {tokenizer}.",
        "",
        "## Tie groups",
        "",
        *(f"- [{', '.join(g.members)}]: `{g.state.value}`, decision `{g.decision.value}`" for g in plan.groups),
        *(["- none: the base model ties no weights"] if not plan.groups else []),
        "",
        "## What was done",
        "",
        *(f"- {action}" for action in actions),
        "",
        "## Verification",
        "",
        _verification_lines(verification),
        "",
        *(["## Where it will run", "", *(f"- {note}" for note in serving), ""] if serving else []),
    ]
    ModelCard("\n".join(lines)).save(str(directory / "README.md"))
    return Action("write-card", (), "wrote the model card README.md (hub metadata, tie decisions, verification)")


def card_name(source: str | None, *, config_file: str | None = None) -> tuple[str | None, str | None]:
    """The name a model card gives a base or an adapter, and its hub id (None where it has none). A card is published
    with the model: it names no local path, only a hub id or a directory's name.

    A hub id is `source` itself when it is one, the repository of a snapshot in huggingface_hub's cache
    (`.../models--org--name/snapshots/<commit>/`), or the `_name_or_path` an older transformers wrote in `config_file`.
    """
    if not source:
        return None, None
    path = Path(source)
    if not path.exists():
        hub_id = source if _is_hub_id(source) else None
        return hub_id or path.name, hub_id
    hub_id = _cached_repo_id(path) or (_recorded_hub_id(path / config_file) if config_file else None)
    return hub_id or path.absolute().name, hub_id


def _is_hub_id(text: str) -> bool:
    """ "org/name" or "name" as the hub spells repository ids, not a path ("./x", "/x", "a/b/c")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # public, not in __all__

    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _cached_repo_id(path: Path) -> str | None:
    """The repository of a snapshot directory in huggingface_hub's cache layout (`models--{org}--{name}`)."""
    parts = path.absolute().parts
    for folder, snapshots in itertools.pairwise(parts):
        if folder.startswith("models--") and snapshots == "snapshots":
            org, _, name = folder.removeprefix("models--").partition("--")
            return f"{org}/{name}" if name else org
    return None


def _recorded_hub_id(config: Path) -> str | None:
    """The hub id recorded as `_name_or_path` in a config.json (transformers before 4.3x wrote it), if it is one."""
    try:
        recorded = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):  # no readable JSON object: the name is the directory's
        return None
    return recorded if isinstance(recorded, str) and _is_hub_id(recorded) else None


def _verification_lines(verification: Verification | None) -> str:
    if verification is None:
        return "Not verified (`verify=False`)."
    logits = verification.max_abs_logits_diff_reloaded
    return (
        f"Reloaded from this directory: {verification.reloaded_tensors_compared} tensors bit-identical to the merged "
        f"ones; max |logits difference| against the adapter model on {verification.probe_tokens} probe tokens "
        f"{logits:.3g} (tolerance {verification.logits_tolerance:.3g})."
        if logits is not None
        else "Checked in memory only."
    )


def push(directory: Path, repo_id: str, *, private: bool, token: str | None, report: MergeReport) -> Action:
    """Upload the verified merged directory to the hub: huggingface_hub's create_repo (if missing) and upload_folder,
    with `token` (None: huggingface_hub's, HF_TOKEN or `hf auth login`). A failure is an UploadError that carries the
    verified merge's report."""
    from huggingface_hub import HfApi

    from safemerge.errors import UploadError

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            repo_type="model",
            commit_message=f"safemerge: verified merge (tie policy {report.policy})",
        )
    except Exception as exc:  # network, authentication, quota: the hub's errors
        raise UploadError(
            f"The merged model is verified and saved in '{directory}', but uploading it to the hub repository "
            f"'{repo_id}' failed ({type(exc).__name__}: {str(exc).strip()[:300]}). Fix: check the token (HF_TOKEN or "
            f"`hf auth login`) and the network, then upload the directory as it is: `hf upload {repo_id} {directory}`.",
            report=report,
        ) from exc
    return Action("push-to-hub", (), f"uploaded the verified merge to {url}")
