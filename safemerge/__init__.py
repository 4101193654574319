"""Merge a PEFT adapter into its base model without silent damage to tied weights, and prove it."""

from safemerge._doctor import doctor
from safemerge._merge import inspect_ties, merge_pretrained, safe_merge, verify_merged
from safemerge._report import (
    DoctorReport,
    Finding,
    MemberCheck,
    MergeReport,
    PolicyOutcome,
    TieGroup,
    TieInspection,
    TieMember,
    TiePolicy,
    Verification,
)
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

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "DoctorReport",
    "Finding",
    "InputError",
    "MemberCheck",
    "MergeReport",
    "NonFiniteWeightsError",
    "OutputBusyError",
    "OutputExistsError",
    "OutputWriteError",
    "PolicyOutcome",
    "SafeMergeError",
    "SafeMergeWarning",
    "TieGroup",
    "TieInspection",
    "TieMember",
    "TiePolicy",
    "TiedWeightsError",
    "UnsupportedAdapterError",
    "Verification",
    "VerificationError",
    "__version__",
    "doctor",
    "inspect_ties",
    "merge_pretrained",
    "safe_merge",
    "verify_merged",
]
