"""HTTP routes, one module per resource; `routers` in the order the app mounts them. Authentication is the
dependency in `auth` that each route declares."""

from server.api import adapters, admin, chat, completions, health, models, usage

routers = [completions.router, chat.router, adapters.router, models.router, usage.router, admin.router,
           health.router]
