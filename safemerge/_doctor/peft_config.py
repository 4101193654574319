"""adapter_config.json as the installed PEFT reads it: its config class, the keys it drops, the scaling it gives."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from packaging.version import InvalidVersion, Version

from safemerge._doctor import peft_settings as _peft_settings
from safemerge._doctor.adapter_files import CONFIG_NAME
from safemerge._doctor.checkup import MAX_LISTED, Checkup
from safemerge._text import listed

#: Values that leave a setting at its default: dropping the key changes nothing.
_UNSET: tuple[object, ...] = (None, False, [], {}, "", 0)


def build_peft_config(data: dict[str, Any], checkup: Checkup) -> Any:
    """The installed PEFT's config object for `data`, or None (and a finding) where it cannot build one."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = data.get("peft_type")
    config_classes = {str(getattr(k, "value", k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    config_class = config_classes.get(str(peft_type))
    if config_class is None:
        checkup.add(
            "unknown-peft-type",
            "error",
            f"{CONFIG_NAME} names peft_type={peft_type!r}, which peft {peft.__version__} does not know.",
            evidence=[f"known: {', '.join(sorted(config_classes))}"],
            fix="Upgrade peft (pip install -U peft), or fix peft_type.",
        )
        return None
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = {k: v for k, v in data.items() if k not in known}
    if unknown:
        _check_unknown_settings(unknown, config_class.__name__, data.get("peft_version"), checkup)
    try:
        return config_class(**{k: v for k, v in data.items() if k in known})
    except Exception as exc:
        checkup.add(
            "bad-config",
            "error",
            f"peft {peft.__version__} rejects {CONFIG_NAME}.",
            evidence=[f"{type(exc).__name__}: {exc}"],
            fix="Fix the value named above, or upgrade peft.",
        )
        return None


def _check_unknown_settings(unknown: dict[str, Any], config_class: str, recorded: Any, checkup: Checkup) -> None:
    """Keys of adapter_config.json this PEFT does not know: a finding only where dropping them changes the adapter.

    PEFT drops unknown keys on load. A setting a newer PEFT release added (`_peft_settings`) changes what the adapter
    computes when it is set; keys PEFT never had (a user's own notes, 0.2-era `enable_lora` / `merge_weights`) do not.
    """
    import peft

    installed = Version(peft.__version__)
    added = _peft_settings.SETTINGS_ADDED.get(config_class, {})
    newer = {k: v for k, v in unknown.items() if k in added and Version(added[k]) > installed}
    used = {k: v for k, v in newer.items() if v not in _UNSET}
    if used:
        _report_newer_settings(used, added, checkup)
    rest = {k: v for k, v in unknown.items() if k not in used}
    if not rest:
        return
    written_by = _release(recorded)
    if written_by is not None and written_by > installed and not set(rest) <= set(newer):
        _report_newer_config(rest, newer, written_by, checkup)
    else:
        _report_unused_keys(rest, newer, checkup)


def _report_newer_settings(used: dict[str, Any], added: dict[str, str], checkup: Checkup) -> None:
    """Settings of newer PEFT releases that are set: the installed PEFT drops them, so the adapter changes."""
    import peft

    release = max((added[k] for k in used), key=Version)
    settings = listed(list(used), limit=MAX_LISTED)
    checkup.add(
        "newer-peft-setting",
        "silent",
        f"{CONFIG_NAME} sets {settings}, which peft {release} added and peft {peft.__version__} does "
        "not know: PEFT drops it on load, so the adapter computes something else than it was trained to.",
        evidence=[f"{_shown(k, v)} (added in peft {added[k]})" for k, v in used.items()],
        fix=f"Upgrade peft: pip install -U 'peft>={release}'.",
    )


def _report_newer_config(rest: dict[str, Any], newer: dict[str, Any], written_by: Version, checkup: Checkup) -> None:
    """Unknown keys in a config a newer PEFT wrote: likely its settings, so silent where one of them is set."""
    import peft

    set_keys = [k for k in rest if k not in newer and rest[k] not in _UNSET]
    shown = listed(set_keys, limit=MAX_LISTED)
    checkup.add(
        "newer-peft-config",
        "silent" if set_keys else "warning",
        f"{CONFIG_NAME} was written by peft {written_by}, newer than peft {peft.__version__}, and has keys this "
        "release does not know; PEFT drops them on load. "
        + (
            f"{shown} {'is' if len(set_keys) == 1 else 'are'} set, so the adapter will compute "
            "something else if that is a setting of the newer release."
            if set_keys
            else "They are at their defaults, so that changes nothing."
        ),
        evidence=[_shown(k, v) for k, v in rest.items()],
        fix=f"Upgrade peft to the release that wrote it: pip install -U 'peft>={written_by}'.",
    )


def _report_unused_keys(rest: dict[str, Any], newer: dict[str, Any], checkup: Checkup) -> None:
    """Keys PEFT never had (or newer settings at their defaults): ignored on load, which changes nothing."""
    import peft

    keys = listed(list(rest), limit=MAX_LISTED)
    checkup.add(
        "unused-config-keys",
        "info",
        f"{CONFIG_NAME} has keys that peft {peft.__version__} does not use ({keys}); PEFT ignores them "
        "on load, which changes nothing"
        + (" (settings of newer releases left at their defaults)." if set(rest) <= set(newer) else "."),
        evidence=[_shown(k, v) for k, v in rest.items()],
    )


def _shown(key: str, value: Any) -> str:
    return f"{key} = {json.dumps(value)[:80]}"


def _release(recorded: Any) -> Version | None:
    """The PEFT release recorded in adapter_config.json ("0.17.2.dev0@abc123" included), or None."""
    try:
        return Version(str(recorded).split("@")[0]) if recorded else None
    except InvalidVersion:
        return None


def report_scaling(peft_model: Any, checkup: Checkup) -> None:
    """The effective LoRA scaling the config gives each module, as information."""
    scales: dict[float, list[str]] = {}
    for name, module in peft_model.get_base_model().named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and scaling:
            scales.setdefault(round(float(next(iter(scaling.values()))), 6), []).append(name)
    if scales:
        checkup.add(
            "scaling",
            "info",
            "Effective LoRA scaling (lora_alpha / r, or / sqrt(r) with rslora) per module: "
            + "; ".join(f"{s:g} on {len(names)} modules" for s, names in sorted(scales.items())),
            evidence=[
                f"{s:g}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for s, names in sorted(scales.items())
            ],
        )
