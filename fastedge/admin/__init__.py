"""The admin listener (:mod:`.api`): health, readiness, metrics, configuration."""

from __future__ import annotations

from fastedge.admin.api import AdminError, AdminRequest, AdminResponse, AdminServer, Handler

__all__ = ["AdminError", "AdminRequest", "AdminResponse", "AdminServer", "Handler"]
