"""Engines execute a merge plan (`safemerge._decide.plan`) action by action; they decide nothing.

`in_memory`: PEFT's own merge of the loaded adapter model, plus the plan's steps on tied tensors and flags.
"""
