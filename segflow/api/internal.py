"""Moved to :mod:`segflow.runtime.internal_api` (services import the runtime, never the product
commands); this name stays for code written against the old one."""

from segflow.runtime.internal_api import *  # noqa: F403
from segflow.runtime.internal_api import error_body, int_param, serve  # noqa: F401
