"""Merge a PEFT adapter into its base model without silent damage to tied weights, and prove it.

The functions that need torch, transformers or PEFT are imported on first use, so that `import safemerge` (and the
command line's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safemerge._findings import DoctorReport, Finding
from safemerge._records import (
    Action,
    GroupPlan,
    GroupState,
    MemberCheck,
    MergePlan,
    MergeReport,
    QuantizedBase,
    ServingCheck,
    TieDecision,
    TieGroup,
    TieInspection,
    TieMember,
    TiePolicy,
    TrainingCheck,
    Verification,
    VocabularyResize,
)
from safemerge._version import __version__
from safemerge.errors import (
    AdapterMismatchError,
    InputError,
    NonFiniteWeightsError,
    OutputBusyError,
    OutputExistsError,
    OutputWriteError,
    QuantizedBaseError,
    SafeMergeError,
    SafeMergeWarning,
    ServingTargetError,
    TiedWeightsError,
    UnsupportedAdapterError,
    UploadError,
    VerificationError,
    VocabularyError,
)

if TYPE_CHECKING:
    from safemerge._callback import SafeMergeCallback
    from safemerge._checks.gguf import GGUFTensorCheck, GGUFVerification
    from safemerge._checks.verify import verify_merged
    from safemerge._decide.analysis import inspect_ties
    from safemerge._decide.forecast import check_before_training
    from safemerge._doctor import doctor
    from safemerge._merge import safe_merge
    from safemerge._pretrained import merge_pretrained

#: Public names imported on first use, and their modules.
_LAZY = {
    "GGUFTensorCheck": "safemerge._checks.gguf",
    "GGUFVerification": "safemerge._checks.gguf",
    "SafeMergeCallback": "safemerge._callback",
    "check_before_training": "safemerge._decide.forecast",
    "doctor": "safemerge._doctor",
    "inspect_ties": "safemerge._decide.analysis",
    "merge_pretrained": "safemerge._pretrained",
    "safe_merge": "safemerge._merge",
    "verify_merged": "safemerge._checks.verify",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'safemerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Action",
    "AdapterMismatchError",
    "DoctorReport",
    "Finding",
    "GGUFTensorCheck",
    "GGUFVerification",
    "GroupPlan",
    "GroupState",
    "InputError",
    "MemberCheck",
    "MergePlan",
    "MergeReport",
    "NonFiniteWeightsError",
    "OutputBusyError",
    "OutputExistsError",
    "OutputWriteError",
    "QuantizedBase",
    "QuantizedBaseError",
    "SafeMergeCallback",
    "SafeMergeError",
    "SafeMergeWarning",
    "ServingCheck",
    "ServingTargetError",
    "TieDecision",
    "TieGroup",
    "TieInspection",
    "TieMember",
    "TiePolicy",
    "TiedWeightsError",
    "TrainingCheck",
    "UnsupportedAdapterError",
    "UploadError",
    "Verification",
    "VerificationError",
    "VocabularyError",
    "VocabularyResize",
    "__version__",
    "check_before_training",
    "doctor",
    "inspect_ties",
    "merge_pretrained",
    "safe_merge",
    "verify_merged",
]
