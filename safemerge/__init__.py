"""Merge a PEFT adapter into its base model without silent damage to tied weights, and prove it."""

from safemerge._analysis import inspect_ties
from safemerge._callback import SafeMergeCallback
from safemerge._doctor import doctor
from safemerge._forecast import check_before_training
from safemerge._merge import merge_pretrained, safe_merge
from safemerge._report import (
    Action,
    DoctorReport,
    Finding,
    GroupPlan,
    GroupState,
    MemberCheck,
    MergePlan,
    MergeReport,
    TieDecision,
    TieGroup,
    TieInspection,
    TieMember,
    TiePolicy,
    TrainingCheck,
    Verification,
)
from safemerge._verify import verify_merged
from safemerge._version import __version__
from safemerge.errors import (
    AdapterMismatchError,
    InputError,
    NonFiniteWeightsError,
    OutputBusyError,
    OutputExistsError,
    OutputWriteError,
    SafeMergeError,
    SafeMergeWarning,
    TiedWeightsError,
    UnsupportedAdapterError,
    VerificationError,
)

__all__ = [
    "Action",
    "AdapterMismatchError",
    "DoctorReport",
    "Finding",
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
    "SafeMergeCallback",
    "SafeMergeError",
    "SafeMergeWarning",
    "TieDecision",
    "TieGroup",
    "TieInspection",
    "TieMember",
    "TiePolicy",
    "TiedWeightsError",
    "TrainingCheck",
    "UnsupportedAdapterError",
    "Verification",
    "VerificationError",
    "__version__",
    "check_before_training",
    "doctor",
    "inspect_ties",
    "merge_pretrained",
    "safe_merge",
    "verify_merged",
]
