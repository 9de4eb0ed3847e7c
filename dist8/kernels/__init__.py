"""Fused update kernels: the rule specification, the reference backend and backend selection."""
from dist8.kernels.reference import ReferenceBackend
from dist8.kernels.registry import BACKEND_NAMES, backend_report, get_backend
from dist8.kernels.rules import FLAG_FIRST_STEP, FLAG_NESTEROV, RULE_STATES, RULE_WRITES_UPDATE, Rule, Scalars, apply_rule

__all__ = [
    "BACKEND_NAMES",
    "FLAG_FIRST_STEP",
    "FLAG_NESTEROV",
    "RULE_STATES",
    "RULE_WRITES_UPDATE",
    "ReferenceBackend",
    "Rule",
    "Scalars",
    "apply_rule",
    "backend_report",
    "get_backend",
]
