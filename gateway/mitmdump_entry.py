"""Entry script for running the gateway inside stock mitmdump:

    mitmdump -s gateway/mitmdump_entry.py \
        --set egress_state_dir=.state --set egress_policies=policies/default

``egress gateway run`` is the recommended way (a lean master, about twice the
throughput); this exists for deployments that already run mitmproxy. Options:
egress_config, egress_policies, egress_state_dir, egress_admin, egress_hosts,
egress_upstream_ca, egress_audit. The egress package must be importable
(``pip install -e .``).
"""

import logging

from gateway.addon import EgressGateway
from gateway.master import QUIET_LOGGERS

for _name in QUIET_LOGGERS:
    if _name != "mitmproxy":
        logging.getLogger(_name).setLevel(logging.WARNING)

addons = [EgressGateway()]
