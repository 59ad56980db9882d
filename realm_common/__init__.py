"""What the server and the worker share besides the contract: how they log,
how they read settings, how they trace and how they answer /metrics.

It imports neither `realm_service` nor `index_worker`; both import it.
"""
