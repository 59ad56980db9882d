"""The web console: live pages over the queue, realms and workers, with the
admin role's actions (docs/OPERATIONS.md, "Web console")."""

from realm_service.web.app import Console, start_console

__all__ = ["Console", "start_console"]
