"""Control plane: routing policy, router, controller (Ray actors, health, placement), typed
worker handles and the in-process cluster. Never imports cluster.tools (offline tools)."""
