"""Policy engine: load YAML+CEL policy files, decide requests (pure), hot reload."""

from gateway.policy.engine import PolicySet, empty_policy_set  # noqa: F401
from gateway.policy.loader import PolicyLoadError, Problem, compile_sources, load_directory  # noqa: F401
from gateway.policy.model import (  # noqa: F401
    ALLOW, DENY, Decision, Destination, Outcome, Principal, Request,
)
from gateway.policy.store import PolicyStore, ReloadResult  # noqa: F401
