"""HTTP routes, one module per resource; `routers` in the order the app mounts them."""

from server.api import adapters, chat, completions, health, models

routers = [completions.router, chat.router, adapters.router, models.router, health.router]
